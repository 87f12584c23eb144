"""Transfer learning on real photos, judged on photos of another source: one real pipeline run per fine-tuning mode.

    python benchmarks/realdata.py PHOTOS_DIR --weights FILE --arch NAME [--other DIR] [--modes head,staged,full]
                                  [--set KEY=VALUE ...] [--jobs 1] [--threads N] [--json FILE]

PHOTOS_DIR and DIR are ImageFolders (``<class>/<image>``). In a temporary copy of the project (a fresh git + DVC
repo, ``data.source: folder`` pointing at PHOTOS_DIR, read in place, never copied) it runs ``dvc repro`` up to
resize once, then, in a copy of that project per mode, ``dvc repro`` with the shipped params.yaml changed only in
``data.*``, ``model.arch``, ``model.weights`` and ``model.finetune`` (plus any ``--set``). Per mode it prints the
own test split's accuracy and, with ``--other``, the accuracy on every photo of DIR as ``kennel predict`` gives
it (the path a user takes), each with its 95 % Wilson interval; the run's linear probe (``head``, ``staged``) and,
with ``--other``, a probe fit here the same way (scikit-learn on the same pretrained features of the same train
split, C chosen on val) scored on DIR; the epoch kept and the pipeline's seconds after resize.
Modes: ``auto`` (the shipped choice), ``head``, ``staged`` and ``full`` from FILE, and ``none``: full fine-tuning
from random init, for contrast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pandas as pd
import yaml
from hostinfo import machine
from project import make_project

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "src"))

# What each mode changes in the shipped params.yaml: the mode, nothing else.
RECIPES = {
    "auto": {"model.finetune": "auto"},
    "head": {"model.finetune": "head"},
    "staged": {"model.finetune": "staged"},
    "full": {"model.finetune": "full"},
    "none": {"model.finetune": "full", "model.weights": "none"},
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
    return run(cmd, cwd, env)[0]


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, str]:
    """Run ``cmd``; returns its seconds and its output (stdout, then stderr), or stops with it when it fails."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return time.perf_counter() - start, out.stdout + out.stderr


def run_mode(prepared: Path, base: dict, mode: str, env: dict, overrides: dict, other: Path | None) -> dict:
    """``dvc repro`` with ``mode``'s params in a copy of the prepared project (data stages already done), then
    ``kennel predict`` on ``other``."""
    root = prepared.with_name(mode)
    shutil.copytree(prepared, root, symlinks=True)
    params = set_params(json.loads(json.dumps(base)), {**RECIPES[mode], **overrides})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seconds = sh([str(BIN / "dvc"), "repro"], root, env)
    test = json.loads((root / "reports/metrics.json").read_text())
    live = json.loads((root / "dvclive/metrics.json").read_text())
    row = {"mode": mode, "test_accuracy": test["test_accuracy"], "test_low": test["test_accuracy_low"],
           "test_high": test["test_accuracy_high"], "test_images": test["test_images"],
           # none where the model learnt from val (train.refit members)
           "val_accuracy": live.get("selected_val_accuracy"), "selected_epoch": live["selected_epoch"],
           "epochs": live["step"], "probe_test": live.get("baseline_test_accuracy"),
           "probe_val": live.get("baseline_val_accuracy"), "seconds": seconds,
           "decided": decided_mode(root), "tta": run_tag(root, "kennel.decision.tta") or run_tag(root, "kennel.tta")}
    if other is not None:
        out = root / "other.csv"
        sh([str(BIN / "python"), "-m", "kennel", "predict", str(other), "--model", "models/model.pt", "--output",
            str(out)], root, {**env, "PYTHONPATH": str(root / "src")})
        row.update(other_scores(pd.read_csv(out, keep_default_na=False)))
    return row


def decided_mode(root: Path) -> str:
    """What ``model.finetune: auto`` chose: the run's tag in the project's store (empty for a mode set by hand)."""
    row = run_tag(root, "kennel.decision.finetune")
    return row.split(":", 1)[0] if "model.finetune auto" in row else ""


def run_tag(root: Path, key: str) -> str:
    """A tag of the project's run ("" when it has none)."""
    with closing(sqlite3.connect(root / "mlflow.db")) as db:
        row = db.execute("SELECT value FROM tags WHERE key = ?", (key,)).fetchone()
    return row[0] if row else ""


def other_scores(predictions: pd.DataFrame) -> dict:
    """Accuracy (and its interval) of ``kennel predict``'s rows, the true class being the photo's folder."""
    from kennel.evaluate.metrics import wilson_interval

    truth = predictions["path"].map(lambda p: Path(p).parent.name)
    hit = predictions["class"] == truth
    correct, n = int(hit.sum()), len(predictions)
    low, high = wilson_interval(correct, n)
    recall = hit.groupby(truth).mean()  # per true class: on balanced other images, their mean is balanced accuracy
    return {"other_accuracy": correct / n, "other_low": low, "other_high": high, "other_images": n,
            "other_balanced_accuracy": float(recall.mean()), "other_worst_recall": float(recall.min()),
            "other_worst_class": str(recall.idxmin())}


def probe_scores(prepared: Path, arch: str, weights: Path, other: Path) -> dict:
    """The linear probe as the runs fit it (kennel's own features and fit), scored on the other photos too."""
    import numpy as np
    import torch

    from kennel.core.device import resolve_amp
    from kennel.data.images import load_array
    from kennel.data.shards import read_meta
    from kennel.evaluate.metrics import wilson_interval
    from kennel.model.network import build_model
    from kennel.train.batches import make_batches
    from kennel.train.fine_tune import extract_features
    from kennel.train.probe import fit_probe

    data = prepared / "data/resized"
    meta = read_meta(data)
    model, _ = build_model(arch, meta["classes"], str(weights))
    model.set_frozen(True)
    cpu = torch.device("cpu")
    amp = resolve_amp("auto", cpu)
    features = {split: extract_features(model, make_batches(data, split, resident=False, batch_size=64, device=cpu),
                                        cpu, amp) for split in ("train", "val", "test")}
    probe = fit_probe(features["train"], features["val"], features["test"], classes=len(meta["classes"]))
    files = sorted(p for c in meta["classes"] for p in (other / c).iterdir())
    x = np.stack([load_array(p, meta["size"], mode=meta.get("recipe", "center_crop")) for p in files])
    y = np.array([meta["classes"].index(p.parent.name) for p in files])
    fx, _ = extract_features(model, [(torch.from_numpy(x[i:i + 64]), torch.from_numpy(y[i:i + 64]))
                                     for i in range(0, len(x), 64)], cpu, amp)
    correct = int((probe.predict_proba(fx.double().numpy()).argmax(1) == y).sum())
    low, high = wilson_interval(correct, len(y))
    return {"probe_c": probe.c, "probe_val": probe.val_accuracy, "probe_test": probe.test_accuracy,
            "probe_other": correct / len(y), "probe_other_low": low, "probe_other_high": high}


def interval(row: dict, key: str) -> str:
    if row.get(key) is None or pd.isna(row.get(key)):
        return ""
    low, high = row.get(f"{key.removesuffix('_accuracy')}_low"), row.get(f"{key.removesuffix('_accuracy')}_high")
    return f"{row[key]:.4f} ({low:.3f}-{high:.3f})" if low is not None else f"{row[key]:.4f}"


def measure(photos: Path, weights: Path, arch: str, other: Path | None, modes: list[str], overrides: dict,
            jobs: int = 1, threads: int | None = None, keep: Path | None = None) -> dict:
    """Every mode on ``photos`` (and ``other``): the rows, the probe fit here, the data and the machine's note.
    ``keep``: the projects stay in this folder (models, reports, MLflow store) instead of a temporary one."""
    other = other.resolve() if other else None  # read from each mode's project folder
    base = set_params(yaml.safe_load((REPO / "params.yaml").read_text()), {
        "data.source": "folder", "data.raw_dir": str(photos.resolve()), "model.arch": arch,
        "model.weights": str(weights.resolve()),
    })
    # bytecode cached as `make` does: where PYTHONDONTWRITEBYTECODE is set, every stage would compile torch and
    # MLflow from source again (seconds per process, most of a short run's time)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # the stages' `python` is this interpreter even when its venv is not activated; no analytics files from DVC
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"})
    env.update({"OMP_NUM_THREADS": str(threads)} if threads else {})
    note = (f"{machine()}; arch {arch}; weights {weights.name}; photos {photos}"
            f"{f'; other {other}' if other else ''}; {jobs} mode(s) at a time, "
            f"{threads or 'default'} torch thread(s) each; params.yaml as shipped but data.*, model.arch, "
            f"model.weights, model.finetune{''.join(f', {k}={v}' for k, v in overrides.items())}")
    print(note, flush=True)

    def one(mode: str) -> dict:
        r = run_mode(prepared, base, mode, env, overrides, other)
        print(f"{mode}: test {interval(r, 'test_accuracy')}  other {interval(r, 'other_accuracy')}  "
              f"(balanced {r.get('other_balanced_accuracy', float('nan')):.4f}, worst recall "
              f"{r.get('other_worst_recall', float('nan')):.4f} {r.get('other_worst_class', '')})  "
              f"epoch {r['selected_epoch']} of {r['epochs']}  {r['seconds']:.0f} s  {r.get('decided', '')}  "
              f"tta {r.get('tta', '')}",
              flush=True)
        return r

    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(str(keep)) if keep else tempfile.TemporaryDirectory(prefix="kennel-realdata-") as tmp:
        prepared = Path(tmp) / "prepared"
        prepared.mkdir()
        make_project(prepared, lambda _: base)
        prep = sh([str(BIN / "dvc"), "repro", "resize"], prepared, env)
        summary = json.loads((prepared / "reports/data_summary.json").read_text())
        print(f"prepare + resize: {prep:.0f} s; {summary['kept']} photos kept of {summary['found']}", flush=True)
        probe = probe_scores(prepared, arch, weights, other) if other else {}
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(one, mode) for mode in modes]
            rows = [f.result() for f in futures]  # a mode that failed stops here, with its output
    return {"machine": note, "prepare_resize_seconds": prep, "overrides": overrides, "probe": probe,
            "rows": rows, "kept": summary["kept"]}


def table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"mode": r["mode"] + (f" ({r['decided']})" if r.get("decided") else ""),
                          "own test": interval(r, "test_accuracy"),
                          "other source": interval(r, "other_accuracy"),
                          "probe (run) val / test": "" if r["probe_val"] is None else
                          f"{r['probe_val']:.4f} / {r['probe_test']:.4f}",
                          "epoch kept": f"{r['selected_epoch']} of {r['epochs']}",
                          "seconds after resize": f"{r['seconds']:.0f}"} for r in rows])


def probe_line(probe: dict) -> str:
    return (f"linear probe (C {probe['probe_c']:g} chosen on val, fit on the train split): val "
            f"{probe['probe_val']:.4f}, own test {probe['probe_test']:.4f}, other source "
            f"{interval(probe, 'probe_other')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="ImageFolder of photos, read in place")
    parser.add_argument("--weights", type=Path, required=True, help="state dict for --arch (full or backbone only)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--other", type=Path, help="ImageFolder of photos of another source, scored per mode")
    parser.add_argument("--modes", default="head,staged,full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml change for every mode (YAML value), e.g. train.refit=true")
    parser.add_argument("--jobs", type=int, default=1, help="modes run at the same time, each in its own copy")
    parser.add_argument("--threads", type=int, help="torch threads per mode (OMP_NUM_THREADS; default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--keep", type=Path, help="keep the projects (models, reports) in this new folder")
    args = parser.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    result = measure(args.photos, args.weights, args.arch, args.other, args.modes.split(","), overrides, args.jobs,
                     args.threads, args.keep)
    print(f"\n{result['machine']}\n")
    print(table(result["rows"]).to_markdown(index=False))
    if result["probe"]:
        print(f"\n{probe_line(result['probe'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
