"""Transfer learning on real photos: the real pipeline once per fine-tuning mode, one table.

    python benchmarks/realdata.py PHOTOS_DIR --weights FILE --arch NAME [--modes head,staged,full,none]
                                  [--jobs 1] [--threads N]

PHOTOS_DIR is an ImageFolder (``<class>/<image>``). In a temporary copy of the project (a fresh git + DVC repo,
``data.source: folder`` pointing at PHOTOS_DIR, which is read in place, never copied) it runs ``dvc repro`` up to
resize once, then, in a copy of that project per mode, ``dvc repro`` with that mode's params (``--jobs`` modes at
a time, ``--threads`` torch threads each), and prints test accuracy, validation accuracy (of the kept epoch),
epochs and the pipeline's seconds after resize (train + evaluate, MLflow logging included).
Modes: ``head``, ``staged`` and ``full`` from FILE, and ``none``: full fine-tuning from random init, for contrast.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import yaml
from hostinfo import machine
from project import make_project

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

COMMON = {"resize.size": 224, "resize.mode": "center_crop", "train.batch_size": 32, "train.optimizer": "adamw",
          "train.select": "best", "train.amp": "auto", "train.label_smoothing": 0.1, "train.schedule": "cosine",
          "train.warmup_epochs": 0.5}
# The recipe per mode: what each `dvc repro` changes in params.yaml.
RECIPES = {
    "head": {"model.finetune": "head", "train.epochs": 10, "train.lr": 0.003},
    "staged": {"model.finetune": "staged", "train.epochs": 4, "train.head_epochs": 2, "train.lr": 0.001,
               "train.backbone_lr_mult": 0.1},
    "full": {"model.finetune": "full", "train.epochs": 3, "train.lr": 0.0003},
    "none": {"model.finetune": "full", "model.weights": "none", "train.epochs": 3, "train.lr": 0.001},
}


def set_params(params: dict, overrides: dict) -> dict:
    for dotted, value in overrides.items():
        node = params
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return params


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    """Run ``cmd``; returns its seconds, or stops with its output when it fails."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return time.perf_counter() - start


def run_mode(prepared: Path, base: dict, mode: str, env: dict) -> dict:
    """``dvc repro`` with ``mode``'s params in a copy of the prepared project (data stages already done)."""
    root = prepared.with_name(mode)
    shutil.copytree(prepared, root, symlinks=True)
    params = set_params(json.loads(json.dumps(base)), RECIPES[mode])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seconds = sh([str(BIN / "dvc"), "repro"], root, env)
    test = json.loads((root / "reports/metrics.json").read_text())
    live = json.loads((root / "dvclive/metrics.json").read_text())
    return {"mode": mode, "test_accuracy": test["test_accuracy"], "val_accuracy": live["selected_val_accuracy"],
            "epochs": live["step"], "seconds": seconds, "recipe": RECIPES[mode]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="ImageFolder of photos, read in place")
    parser.add_argument("--weights", type=Path, required=True, help="state dict for --arch (full or backbone only)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--modes", default="head,staged,full,none")
    parser.add_argument("--jobs", type=int, default=1, help="modes run at the same time, each in its own copy")
    parser.add_argument("--threads", type=int, help="torch threads per mode (OMP_NUM_THREADS; default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    base = set_params(yaml.safe_load((REPO / "params.yaml").read_text()), {
        **COMMON, "data.source": "folder", "data.raw_dir": str(args.photos.resolve()), "model.arch": args.arch,
        "model.weights": str(args.weights.resolve()),
    })
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    env_note = (f"{machine()}; arch {args.arch}; weights {args.weights.name}; photos {args.photos}; "
                f"{args.jobs} mode(s) at a time, {args.threads or 'default'} torch thread(s) each")
    print(env_note, flush=True)

    def one(mode: str) -> dict:
        r = run_mode(prepared, base, mode, env)
        print(f"{mode}: test {r['test_accuracy']:.4f}  val {r['val_accuracy']:.4f}  "
              f"{r['epochs']} epochs  {r['seconds']:.0f} s", flush=True)
        return r

    with tempfile.TemporaryDirectory(prefix="kennel-realdata-") as tmp:
        prepared = Path(tmp) / "prepared"
        prepared.mkdir()
        make_project(prepared, lambda _: base)
        prep = sh([str(BIN / "dvc"), "repro", "resize"], prepared)
        summary = json.loads((prepared / "reports/data_summary.json").read_text())
        print(f"prepare + resize: {prep:.0f} s; {summary['kept']} photos kept of {summary['found']}", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(one, args.modes.split(",")))
    table = pd.DataFrame(rows)[["mode", "test_accuracy", "val_accuracy", "epochs", "seconds"]]
    print(f"\n{env_note}\n")
    print(table.to_markdown(index=False, floatfmt=(".0f", ".4f", ".4f", ".0f", ".0f")))
    print("\ncommon params: " + ", ".join(f"{k}={v}" for k, v in COMMON.items()))
    for r in rows:
        print(f"{r['mode']}: " + ", ".join(f"{k}={v}" for k, v in r["recipe"].items()))
    if args.json:
        args.json.write_text(json.dumps({"machine": env_note, "prepare_resize_seconds": prep, "common": COMMON,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
