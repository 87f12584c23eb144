"""One real training run, timed piece by piece: ``kennel.train.fine_tune.train(...)`` on resized uint8 arrays.

    python benchmarks/fit.py [--device cuda] [--per-class 2000] [--size 224] [--batch-size 256] [--epochs 3]
                             [--compile] [--data DIR]

The arrays are kennel's synthetic cat/dog scenes (``kennel.data.synthetic``) rendered straight to uint8 at
``--size`` (no JPEG round trip) and split 70/15/15 by ``kennel.data.manifest.split_of``; or, with ``--data``, a
folder the resize stage wrote. Everything else comes from the repository's params.yaml (optimizer, schedule,
augmentation, ``amp: auto``, ``data_on_device: auto``), with ``model.weights: none`` unless ``--weights`` says
otherwise. Prints where the time of ``train()`` goes (start-up, placing the arrays, training steps, validation),
each epoch's img/s and accuracy, the test accuracy and the peak GPU memory. Needs torch, torchvision, numpy,
pandas, pillow, pyyaml and tqdm; no dvc, no mlflow; installs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kennel.core.params import params_from_dict  # noqa: E402
from kennel.data.images import to_array  # noqa: E402
from kennel.data.manifest import split_of  # noqa: E402
from kennel.data.shard_writer import write_splits  # noqa: E402
from kennel.data.shards import read_meta, read_split  # noqa: E402
from kennel.data.synthetic import CLASSES, render  # noqa: E402
from kennel.train import fine_tune  # noqa: E402
from kennel.train.batches import Batches  # noqa: E402
from kennel.train.loop import evaluate  # noqa: E402

SEED = 0


def _scene(path: str | Path, size: int) -> np.ndarray:
    """Loader for ``write_splits``: the "path" ``<class>/<index>`` names a synthetic scene, drawn on the spot."""
    p = Path(path)
    return to_array(render(p.parent.name, SEED, int(p.name)), size, mode="center_crop")


def make_data(out: Path, per_class: int, size: int) -> Path:
    names = [f"{label}/{i:06d}" for label in CLASSES for i in range(per_class)]
    sha1 = [hashlib.sha1(n.encode()).hexdigest() for n in names]
    manifest = pd.DataFrame({"path": names, "label": [n.split("/")[0] for n in names],
                             "split": [split_of(s, SEED, 0.15, 0.15) for s in sha1], "sha1": sha1})
    write_splits(manifest, out, size, out, _scene, "auto", recipe="synthetic scenes")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_placement(seconds: list[float], device: torch.device):
    """Wraps ``fine_tune.make_batches`` (reading a split and placing it on the device) to time it."""
    inner = fine_tune.make_batches

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        return out

    return timed


def run(args, data_dir: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["resize"]["size"] = read_meta(data_dir)["size"]
    raw["model"]["weights"] = args.weights
    raw["train"].update(device=args.device, batch_size=args.batch_size, epochs=args.epochs, compile=args.compile,
                        select="last", num_workers=0)
    params = params_from_dict(raw)
    device = torch.device(args.device)
    counts = {s: len(read_split(data_dir, s)[1]) for s in ("train", "val", "test")}
    print(f"data: {counts['train']} train / {counts['val']} val / {counts['test']} test images, "
          f"{raw['resize']['size']} px, in {data_dir}", flush=True)

    placement: list[float] = []
    fine_tune.make_batches = _timed_placement(placement, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks: dict[str, float] = {}

    def on_start(result) -> None:
        _sync(device)
        marks["started"] = time.perf_counter()

    _sync(device)
    start = time.perf_counter()
    result = fine_tune.train(params, data_dir, on_start=on_start)
    _sync(device)
    total = time.perf_counter() - start

    x, y = read_split(data_dir, "test")
    test = Batches(torch.from_numpy(np.array(x)).to(device), torch.from_numpy(y), args.batch_size)
    test_loss, test_acc = evaluate(result.model, test, device, result.amp_dtype)

    n = counts["train"]
    n -= n > 1 and n % args.batch_size == 1  # the lone last sample a shuffled epoch drops
    step_s = [n / r.images_per_second for r in result.history]
    val_s = [r.seconds - s for r, s in zip(result.history, step_s, strict=True)]
    startup = marks["started"] - start
    epochs_s = sum(r.seconds for r in result.history)
    print(f"\ntrain(): device {result.device}, amp {result.amp_dtype}, data {result.data_placement}, "
          f"compile {args.compile}, batch {args.batch_size}, torch {torch.__version__}")
    print("| epoch | seconds | training steps s | validation s | train img/s | train loss | train acc | val acc |")
    print("|---|---|---|---|---|---|---|---|")
    for r, s, v in zip(result.history, step_s, val_s, strict=True):
        print(f"| {r.epoch} | {r.seconds:.2f} | {s:.2f} | {v:.2f} | {r.images_per_second:.0f} | "
              f"{r.train_loss:.4f} | {r.train_accuracy:.3f} | {r.val_accuracy:.3f} |")
    later = [r.images_per_second for r in result.history[1:]]
    if later:
        print(f"\nimg/s after the first epoch (median of {len(later)}): {statistics.median(later):.0f}")
    print(f"test accuracy {test_acc:.3f} (loss {test_loss:.4f}) on {counts['test']} images")
    print("\n| where train() spent its time | seconds | share |")
    print("|---|---|---|")
    for name, sec in [("start-up: model, arrays read and placed (before epoch 1)", startup),
                      ("  of which reading + placing the arrays", sum(placement) if placement else float("nan")),
                      ("training steps (all epochs)", sum(step_s)),
                      ("validation (all epochs)", sum(val_s)),
                      ("after the last epoch (keeping the selected weights)", total - startup - epochs_s),
                      ("train() in all", total)]:
        print(f"| {name} | {sec:.2f} | {100 * sec / total:.0f}% |")
    if device.type == "cuda":
        print(f"\npeak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved by torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--per-class", type=int, default=2000, help="synthetic scenes per class")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="train.compile: true")
    parser.add_argument("--weights", default="none", help="model.weights (none: no download is attempted)")
    parser.add_argument("--data", type=Path, help="a resized folder to train on instead of generated scenes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.data is not None:
        run(args, args.data)
        return
    with tempfile.TemporaryDirectory(prefix="kennel-fit-") as tmp:
        start = time.perf_counter()
        data_dir = make_data(Path(tmp), args.per_class, args.size)
        print(f"generated {2 * args.per_class} scenes at {args.size} px in {time.perf_counter() - start:.1f} s")
        run(args, data_dir)


if __name__ == "__main__":
    os.environ.setdefault("KENNEL_OFFLINE", "1")
    main()
