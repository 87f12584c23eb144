"""Which training choices transfer: ``train()`` in-process per variant, scored on the own test split and on photos of
another source, next to the linear probe. The measurements behind the shipped per-mode behaviour.

    python benchmarks/transfer_ablation.py PHOTOS_DIR OTHER_DIR --weights FILE --arch NAME \\
        --variant "head: model.finetune=head" --variant "staged: model.finetune=staged train.freeze_bn=false" ...

A temporary copy of the project runs ``dvc repro resize`` once on PHOTOS_DIR (read in place); OTHER_DIR's photos
are decoded once with the same size and resize mode. Each variant is the shipped params.yaml (data.*,
model.arch, model.weights set here) with its ``KEY=VALUE`` changes, trained with ``kennel.train.fine_tune.train``
on the prepared data (no MLflow, no evaluate stage: accuracy and log loss computed here with the model's own
``predict_arrays``). One variant at a time; prints one row per variant and the probe's row (C chosen on val).

``--interpolate A B`` also scores the kept weights of variants A and B averaged, w = (1 - t) A + t B for t in 0.25,
0.5, 0.75 (weight-space ensembles, WiSE-FT: Wortsman et al., 2022, with A the head on the frozen backbone and B
the model trained in all layers; both keep the pretrained BatchNorm statistics when ``freeze_bn`` holds them).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from hostinfo import machine
from project import make_project
from realdata import set_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "src"))

from kennel.core.device import resolve_amp  # noqa: E402
from kennel.core.params import params_from_dict  # noqa: E402
from kennel.data.images import load_array  # noqa: E402
from kennel.data.shards import read_meta, read_split  # noqa: E402
from kennel.evaluate.metrics import wilson_interval  # noqa: E402
from kennel.model.inference import LoadedModel, predict_arrays  # noqa: E402
from kennel.train.fine_tune import train  # noqa: E402
from kennel.train.recipe import blend_weights  # noqa: E402


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    correct = int((probs.argmax(1) == labels).sum())
    low, high = wilson_interval(correct, len(labels))
    loss = float(-np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean())
    return {"accuracy": correct / len(labels), "low": low, "high": high, "loss": loss}


def interpolations(a, b, names, score_model) -> list[dict]:
    """Rows for the weights of ``a`` and ``b`` averaged, as ``train.blend`` averages them."""
    wa, wb = a.state_dict(), b.state_dict()
    mixed = copy.deepcopy(b)
    rows = []
    for t in (0.25, 0.5, 0.75):
        mixed.load_state_dict(wb)
        blend_weights(mixed, wa, t)  # what train.blend does: t x b + (1 - t) x a
        val, own, other = score_model(mixed)
        row = {"variant": f"{1 - t:g} {names[0]} + {t:g} {names[1]}", "changes": {}, "own_test": own,
               "other": other, "val_loss": val["loss"], "val_accuracy": val["accuracy"], "epoch": "-",
               "seconds": 0.0, "probe": None}
        print(f"{row['variant']}: own test {own['accuracy']:.4f} loss {own['loss']:.3f}; other "
              f"{other['accuracy']:.4f} ({other['low']:.3f}-{other['high']:.3f}) loss {other['loss']:.3f}; "
              f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--variant", action="append", required=True, metavar="'NAME: KEY=VALUE ...'")
    parser.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="average the kept weights of two variants")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    base = set_params(yaml.safe_load((REPO / "params.yaml").read_text()), {
        "data.source": "folder", "data.raw_dir": str(args.photos.resolve()), "model.arch": args.arch,
        "model.weights": str(args.weights.resolve())})
    print(machine(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kennel-ablation-") as tmp:
        root = make_project(Path(tmp) / "project", lambda _: base)
        subprocess.run([str(BIN / "dvc"), "repro", "resize"], cwd=root, check=True, capture_output=True)
        data = root / "data/resized"
        meta = read_meta(data)
        files = sorted(p for c in meta["classes"] for p in (args.other / c).iterdir())
        other_x = np.stack([load_array(p, meta["size"], mode=meta["recipe"]) for p in files])
        other_y = np.array([meta["classes"].index(p.parent.name) for p in files])
        test_x, test_y = read_split(data, "test")
        test_x = np.asarray(test_x)
        amp = resolve_amp("auto", torch.device("cpu"))
        kept_models = {}
        val_x, val_y = read_split(data, "val")
        val_x = np.asarray(val_x)

        def score_model(module):
            model = LoadedModel(module.eval(), module.classes, meta["size"], meta["recipe"])
            return [scores(predict_arrays(x, model, 64, amp_dtype=amp), y)
                    for x, y in ((val_x, val_y), (test_x, test_y), (other_x, other_y))]

        for variant in args.variant:
            name, _, changes = variant.partition(":")
            overrides = {k: yaml.safe_load(v) for k, v in (c.split("=", 1) for c in changes.split())}
            params = params_from_dict(set_params(json.loads(json.dumps(base)), overrides))
            start = time.perf_counter()
            result = train(params, data)
            seconds = time.perf_counter() - start
            kept_models[name.strip()] = result.model
            _, own, other = score_model(result.model)
            kept = next(r for r in result.history if r.epoch == result.selected_epoch)
            # the weights kept: a blend of two states has val numbers of its own (train.blend)
            val_loss, val_accuracy = result.blended_val or (kept.val_loss, kept.val_accuracy)
            row = {"variant": name.strip(), "changes": overrides, "own_test": own, "other": other,
                   "val_loss": val_loss, "val_accuracy": val_accuracy,
                   "epoch": f"{result.selected_epoch} of {result.epochs}", "seconds": seconds,
                   "probe": dataclasses.asdict(result.probe) if result.probe else None}
            rows.append(row)
            print(f"{row['variant']}: own test {own['accuracy']:.4f} ({own['low']:.3f}-{own['high']:.3f}) "
                  f"loss {own['loss']:.3f}; other {other['accuracy']:.4f} ({other['low']:.3f}-{other['high']:.3f}) "
                  f"loss {other['loss']:.3f}; val loss {val_loss:.4f} acc {val_accuracy:.4f}; "
                  f"epoch {row['epoch']}; {seconds:.0f} s", flush=True)
        if args.interpolate:
            rows += interpolations(*(kept_models[n] for n in args.interpolate), args.interpolate, score_model)
    table = pd.DataFrame([{"variant": r["variant"], "own test": f"{r['own_test']['accuracy']:.4f}",
                           "other source": f"{r['other']['accuracy']:.4f}", "other loss": f"{r['other']['loss']:.3f}",
                           "val loss": f"{r['val_loss']:.4f}", "epoch kept": r["epoch"]} for r in rows])
    print("\n" + table.to_markdown(index=False))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                        else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
