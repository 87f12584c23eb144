"""Recipe variants side by side over several splits of one labelled folder, scored on its own val + test images.

    python benchmarks/sweep.py FOLDER --weights W.pth --arch mobilenet_v2 --seeds 0 1 2 3 \\
        --variant shipped --variant "longer:train.epochs=25" --variant "lr2x:train.lr=0.002" [--device cuda]

FOLDER holds one sub-folder of images per class. Each seed splits it anew (``split_of`` with that seed, 70/15/15)
and is resized once; every variant then trains on that split with the repository's params.yaml, ``model.finetune:
auto`` and only the variant's keys changed, the training seed the split's, so variants are compared pair by pair
on the same images. The kept model (its test-time augmentation as decided) is scored on that split's val and test
images, which no variant sees while choosing what it keeps beyond val's usual role. No other images are read: a
folder scored in the end goes through the pipeline, not through this script. One JSON line per run goes to
``--out`` as it finishes (a run cut short keeps the earlier ones), and a table of per-variant means and paired
differences to the first variant is printed at the end. Needs torch, torchvision, numpy, pandas, pillow, pyyaml,
scikit-learn and tqdm; no dvc, no mlflow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from realdata import REPO, set_params  # puts src/ on the path

from kennel.core.params import params_from_dict
from kennel.data.images import load_array
from kennel.data.manifest import assign_splits
from kennel.data.shard_writer import write_splits
from kennel.data.shards import read_split
from kennel.data.sources import from_folder
from kennel.train import fine_tune
from kennel.train.batches import Batches
from kennel.train.loop import evaluate


def manifest_of(folder: Path, seed: int) -> pd.DataFrame:
    """``folder``'s images (prepare's folder layout) split 70/15/15 by content and ``seed`` as prepare splits."""
    files = [c for c in from_folder(folder) if c.label]
    frame = pd.DataFrame({"path": [str(c.path.relative_to(folder)) for c in files],
                          "label": [c.label for c in files],
                          "sha1": [hashlib.sha1(c.path.read_bytes()).hexdigest() for c in files]})
    return assign_splits(frame, 0.15, 0.15, seed)


def _load(path, size: int) -> np.ndarray:
    return load_array(path, size, mode="center_crop")


def variant(spec: str) -> tuple[str, dict[str, str]]:
    """``name:key=value,key=value`` (``name`` alone: the shipped params)."""
    name, _, sets = spec.partition(":")
    pairs = [kv.split("=", 1) for kv in sets.split(",") if kv]
    if not name or any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--variant {spec!r}: expected name[:key=value,key=value]")
    return name, dict(pairs)


def params_for(args, sets: dict[str, str], seed: int, size: int):
    raw = set_params(yaml.safe_load((REPO / "params.yaml").read_text()), {
        "seed": seed, "resize.size": size, "model.arch": args.arch, "model.weights": args.weights,
        "model.finetune": "auto", "train.device": args.device, "train.num_workers": 0})
    return params_from_dict(set_params(raw, {key: yaml.safe_load(value) for key, value in sets.items()}))


def score(model, data_dir: Path, split: str, device: torch.device, amp) -> tuple[int, int]:
    """(images right, images) of ``split``."""
    x, y = read_split(data_dir, split)
    _, accuracy = evaluate(model, Batches(torch.from_numpy(np.array(x)), torch.from_numpy(np.asarray(y)), 64),
                           device, amp)
    return round(accuracy * len(y)), len(y)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--variant", action="append", default=[], help="name[:key=value,...]; the first is the baseline")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kennel-sweep"))
    ap.add_argument("--out", type=Path, default=Path("sweep.jsonl"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    variants = [variant(v) for v in args.variant or ["shipped"]]
    for name, sets in variants:  # a wrong key or value stops the sweep here, before any image is read
        try:
            params_for(args, sets, args.seeds[0], args.size)
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"--variant {name}: {type(e).__name__}: {e}") from None
    runs = []
    for seed in args.seeds:
        data_dir = args.work / f"{args.folder.name}-{seed}"
        start = time.perf_counter()
        write_splits(manifest_of(args.folder, seed), args.folder, args.size, data_dir,
                     _load, "auto", recipe="center_crop")
        print(f"seed {seed}: resized in {time.perf_counter() - start:.1f} s", flush=True)
        for name, sets in variants:
            params = params_for(args, sets, seed, args.size)
            start = time.perf_counter()
            result = fine_tune.train(params, data_dir)
            result.model.tta = result.tta
            result.model.eval()
            (val_ok, n_val), (test_ok, n_test) = (score(result.model, data_dir, s, result.device, result.amp_dtype)
                                                  for s in ("val", "test"))
            run = {"folder": args.folder.name, "seed": seed, "variant": name, "sets": sets,
                   "val": val_ok / n_val, "test": test_ok / n_test, "own": (val_ok + test_ok) / (n_val + n_test),
                   "n": n_val + n_test, "epochs_kept": result.selected_epoch, "epochs": len(result.history),
                   "tta": result.tta, "decisions": result.decisions, "seconds": time.perf_counter() - start,
                   "device": str(result.device), "torch": torch.__version__}
            runs.append(run)
            with args.out.open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(f"seed {seed} {name:>12}: own {run['own']:.4f} (val {run['val']:.4f}, test {run['test']:.4f}) "
                  f"kept {run['epochs_kept']}/{run['epochs']} tta {run['tta']} {run['seconds']:.1f} s", flush=True)
    print_table(runs, [name for name, _ in variants])
    return 0


def print_table(runs: list[dict], names: list[str]) -> None:
    """Per variant: mean own accuracy over seeds, and the paired difference to the first variant."""
    by = {(r["variant"], r["seed"]): r["own"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    print(f"\n| variant | own val + test, mean of {len(seeds)} splits | per split | vs {names[0]}, mean (min, max) |")
    print("|---|--:|---|---|")
    for name in names:
        own = [by[name, s] for s in seeds if (name, s) in by]
        if not own:
            continue
        diffs = [by[name, s] - by[names[0], s] for s in seeds if (name, s) in by and (names[0], s) in by]
        print(f"| {name} | {statistics.mean(own):.4f} | {' '.join(f'{o:.3f}' for o in own)} | "
              f"{statistics.mean(diffs):+.4f} ({min(diffs):+.4f}, {max(diffs):+.4f}) |")


if __name__ == "__main__":
    sys.exit(main())
