"""Predict benchmark: `kennel predict` against its two floors, on the same real photos and model, in one run.

    python benchmarks/predict.py [--photos ../shared/realdata] [--n 2000] [--weights FILE]

The photos are the real ones of ../shared/realdata (photos/ and photos_other/, repeated up to N paths); the model is
a MobileNetV2 with its real ImageNet features and a new 2-class head (predictions are not scored: speed only).
Each measurement runs in its own process on warm files:
  decode   the resize stage's own decode + resize (plain_arrays.write_split, workers=auto): the decode floor
  model    the model alone on ready uint8 tensors at the inference batch (8 on a CPU), mixed precision as
           `--amp auto` picks it
  evaluate the evaluate stage's pass (kennel.train.loop.predict over the decoded images)
  features feature extraction for head / staged (kennel.train.fine_tune.extract_features, the backbone only)
  before   every file decoded in the main process, then the model in fp32: what `kennel predict` did before
  serial   the same with mixed precision (workers 0)
  predict  kennel.cli.predict.predict_batches as the CLI runs it (workers auto, amp auto), after start-up
  onnx     the same on onnxruntime (`kennel predict --runtime onnx`), fp32 and int8 (the ONNX files `kennel export`
           writes; benchmarks/export.py runs these rows beside the PyTorch ones, and scores them)
and prints images/s, predict / min(decode, model) (the goal: >= 0.85), and the peak RSS at N/20 and N files.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from hostinfo import machine, run_child

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SHARED = ROOT.parent / "shared" / "realdata"


def _child(method: str, listing: Path, model_file: Path, work: Path) -> float:
    sys.path.insert(0, str(SRC))
    if method == "onnx":  # model_file is an .onnx file; this child never imports torch
        return _onnx_child(listing, model_file)
    import numpy as np
    import torch
    from plain_arrays import read_plain, write_split

    from kennel.cli.predict import predict_batches
    from kennel.core.device import inference_batch, resolve_amp
    from kennel.data.images import load_array
    from kennel.model.inference import load_model_file, predict_arrays
    from kennel.train.batches import Batches
    from kennel.train.fine_tune import extract_features
    from kennel.train.loop import predict

    paths = [Path(p) for p in listing.read_text().split("\n")]
    model = load_model_file(model_file)
    cpu = torch.device("cpu")
    amp = resolve_amp("auto", cpu)
    start = time.perf_counter()
    if method == "decode":
        write_split(work / f"decoded-{len(paths)}", "bench", paths, [0] * len(paths), model.size,
                    partial(load_array, mode=model.mode), "auto")
    elif method in ("model", "evaluate", "features"):
        out = work / f"ready-{len(paths)}"
        if not (out / "bench_x.npy").exists():
            write_split(out, "bench", paths, [0] * len(paths), model.size, partial(load_array, mode=model.mode), "auto")
        images = np.array(read_plain(out, "bench")[0])
        # resident batches of the decoded images, as a run whose split fits in memory has them
        loader = Batches(torch.from_numpy(images), torch.zeros(len(images), dtype=torch.long), inference_batch(cpu))
        start = time.perf_counter()
        if method == "model":
            predict_arrays(images, model, amp_dtype=amp)
        elif method == "evaluate":  # the evaluate stage's pass over the decoded split
            predict(model.module, loader, cpu, amp)
        else:  # head and staged: the backbone's features of every image, once
            extract_features(model.module, loader, cpu, amp)
    else:  # before: what `kennel predict` did until now (serial decode, fp32)
        for _ in predict_batches(paths, model, batch_size=32, workers="auto" if method == "predict" else 0,
                                 amp_dtype=None if method == "before" else amp):
            pass
    return time.perf_counter() - start


def _onnx_child(listing: Path, model_file: Path) -> float:
    from kennel.cli.predict import predict_batches
    from kennel.model.onnx_inference import load_onnx_model

    paths = [Path(p) for p in listing.read_text().split("\n")]
    model = load_onnx_model(model_file)
    start = time.perf_counter()
    for _ in predict_batches(paths, model, batch_size=32):
        pass
    assert "torch" not in sys.modules
    return time.perf_counter() - start


def measure(method: str, paths: list[str], model_file: Path, work: Path) -> tuple[float, float]:
    """(seconds inside the child after its start-up, peak RSS in MiB of the child and its workers)."""
    listing = work / f"{method}-{model_file.stem}-{len(paths)}.txt"
    listing.write_text("\n".join(paths))
    cmd = [sys.executable, __file__, "--child", method, "--list", str(listing), "--model", str(model_file),
           "--work", str(work)]
    last, rss = run_child(cmd, method)
    return json.loads(last), rss


def build_model(weights: Path, out: Path) -> Path:
    sys.path.insert(0, str(SRC))
    from kennel.model.file import save_model
    from kennel.model.network import build_model as build

    model, _ = build("mobilenet_v2", ["cat", "dog"], weights=str(weights))
    save_model(model.eval(), out, size=224, arch="mobilenet_v2", mode="center_crop")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=SHARED)
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_imagenet_features.pth")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--child", choices=["decode", "model", "evaluate", "features", "before", "serial", "predict",
                                            "onnx"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--list", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.list, args.model, args.work)))
        return

    found = sorted(str(p) for p in args.photos.rglob("*.jpg") if "weights" not in p.parts)
    if not found:
        raise SystemExit(f"{args.photos}: no photos (see ../shared/realdata/README)")
    paths = [found[i % len(found)] for i in range(args.n)]
    with tempfile.TemporaryDirectory(prefix="kennel-predict-bench-") as tmp:
        work = Path(tmp)
        model_file = build_model(args.weights, work / "model.pt")
        print(f"machine: {machine()}")
        print(f"{len(paths)} paths over {len(found)} real photos in {args.photos}; mobilenet_v2, 224 px center_crop\n")
        rows = {}
        for n in (len(paths) // 20, len(paths)):
            for method in ("decode", "model", "evaluate", "features", "before", "serial", "predict"):
                if method in ("evaluate", "features", "before", "serial") and n != len(paths):
                    continue
                seconds, rss = measure(method, paths[:n], model_file, work)
                rows[method, n] = (seconds, n / seconds, rss)
        print("| method | files | seconds | images/s | peak RSS (MiB) |")
        print("|---|---|---|---|---|")
        for (method, n), (seconds, rate, rss) in rows.items():
            print(f"| {method} | {n} | {seconds:.1f} | {rate:.0f} | {rss:.0f} |")
        full = len(paths)
        floor = min(rows["decode", full][1], rows["model", full][1])
        print(f"\npredict / min(decode, model) at {full} files: {rows['predict', full][1] / floor:.2f} "
              f"(goal >= 0.85); predict / serial: {rows['predict', full][1] / rows['serial', full][1]:.2f}x; "
              f"predict / before: {rows['predict', full][1] / rows['before', full][1]:.2f}x")
        for method in ("evaluate", "features"):
            print(f"{method} / model at {full} files: {rows[method, full][1] / rows['model', full][1]:.2f}")
        small = len(paths) // 20
        rss = rows["predict", small][2], rows["predict", full][2]
        print(f"predict peak RSS: {rss[0]:.0f} MiB at {small} files -> {rss[1]:.0f} MiB at {full} "
              f"({rss[1] / rss[0]:.2f}x)")


if __name__ == "__main__":
    main()
