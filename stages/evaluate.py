"""evaluate: score the trained model on the test split; write DVC metrics/plots and log them to the train run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from kennel import track
from kennel.core.params import Params
from kennel.core.paths import (
    CALIBRATION,
    CONFUSION,
    DATA_SUMMARY,
    FIGURES,
    MANIFEST,
    METRICS,
    MODEL,
    PR_DIR,
    PREDICTIONS,
    RESIZED,
    ROC_DIR,
    RUN_FILE,
    project_root,
)
from kennel.core.plots import image_grid
from kennel.core.stage import run_stage
from kennel.data.report import FIGURES as DATA_FIGURES
from kennel.evaluate.evaluation import Evaluation, evaluate_model, file_name
from kennel.evaluate.figures import confusion_png, pr_png, reliability_png, roc_png
from kennel.evaluate.note import run_note


def evaluate_stage(params: Params) -> None:
    run_id = track.read_run_file(RUN_FILE)
    e = params.evaluate
    result = evaluate_model(MODEL, RESIZED, MANIFEST, device=params.train.device, amp=params.train.amp,
                            calibration_bins=e.calibration_bins)
    m = result.metrics
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    METRICS.write_text(json.dumps({"test": m}, indent=2) + "\n")
    result.confusion_rows().to_csv(CONFUSION, index=False)
    result.predictions().to_csv(PREDICTIONS, index=False)
    result.reliability.to_csv(CALIBRATION, index=False)
    curve_files = write_curves(result)
    figures = write_figures(result, e.top_losses, e.calibration_bins)

    scalars = {"test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"], "test_ece": m["ece"]}
    for key in ("roc_auc", "average_precision"):
        if key in m:
            scalars[f"test_{key}"] = m[key]
    for name, r in m["per_class"].items():
        scalars.update({f"test_{k}_{name}": r[k] for k in ("precision", "recall", "f1")})
    for name, r in m.get("one_vs_rest", {}).items():
        scalars.update({f"test_{k}_{name}": v for k, v in r.items()})
    root = project_root()
    with track.open_run(root, params.mlflow.experiment, run_id=run_id):
        track.log_metrics(scalars)
        track.log_dict(m, "evaluation/metrics.json")
        track.log_artifacts(figures + [CONFUSION, PREDICTIONS, CALIBRATION], "evaluation")
        track.log_artifacts(curve_files, "evaluation/curves")
        links = [(FIGURE_TITLES[p.name], f"evaluation/{p.name}") for p in figures]
        links += [(title, f"data/{name}") for name, title in DATA_FIGURES.items()]
        track.note(run_note(
            m, json.loads(DATA_SUMMARY.read_text()), track.experiment_id(params.mlflow.experiment, root), run_id,
            track.run_tag(run_id, "kennel.selected_epoch"),
            params.train.epochs, params.train.select, links,
            warnings=[track.run_tag(run_id, f"kennel.{kind}_warning") for kind in ("data", "weights")],
        ))
        mf = params.mlflow
        if mf.registered_model:
            model_uri = track.run_tag(run_id, "kennel.serving_uri") or track.run_tag(run_id, "kennel.model_uri")
            reg = track.register_and_promote(root, run_id, model_uri, mf.registered_model, mf.promote_if_better)
            track.set_tags({"kennel.registered_version": reg.version, "kennel.promoted": str(reg.promoted).lower()})
            print(f"registered {mf.registered_model} version {reg.version}; "
                  f"{'now' if reg.promoted else 'not'} champion ({reg.reason})")
    print(f"test accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}"
          + (f"  ROC AUC {m['roc_auc']:.4f}" if "roc_auc" in m else "") + f"  ECE {m['ece']:.4f}")


FIGURE_TITLES = {
    "top_losses.png": "top losses", "top_losses_gradcam.png": "top losses, Grad-CAM",
    "confusion_matrix.png": "confusion matrix", "roc.png": "ROC", "pr.png": "precision-recall",
    "reliability.png": "reliability",
}


def write_curves(result: Evaluation) -> list[Path]:
    """One ROC and one precision-recall table per curve, named after its class; stale classes are removed."""
    files = []
    for folder, table in ((ROC_DIR, "roc"), (PR_DIR, "pr")):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for c in result.curves:
            path = folder / f"{file_name(c.name)}.csv"
            getattr(c, table).to_csv(path, index=False)
            files.append(path)
    return files


def write_figures(result: Evaluation, k: int, bins: int) -> list[Path]:
    top = result.top_losses(k)
    images, captions = [np.array(result.images[i]) for i in top], result.captions(top)
    colors = ["black" if result.labels[i] == result.predicted[i] else "tab:red" for i in top]
    what = f"the {len(top)} test images with the highest loss, highest first (red: wrong)"
    figures = [
        image_grid(images, captions, FIGURES / "top_losses.png", f"Top losses: {what}", colors=colors),
        image_grid(images, captions, FIGURES / "top_losses_gradcam.png",
                   f"Grad-CAM of the predicted class (heat: evidence) on {what}", heat=result.cams(top), colors=colors),
        confusion_png(np.array(result.metrics["confusion_matrix"]), result.classes, FIGURES / "confusion_matrix.png"),
        reliability_png(result.reliability, result.metrics["ece"], bins, FIGURES / "reliability.png"),
    ]
    if result.curves:
        figures += [roc_png(result.curves, FIGURES / "roc.png"), pr_png(result.curves, FIGURES / "pr.png")]
    return figures


def main(argv=None) -> int:
    return run_stage("evaluate", evaluate_stage, argv)


if __name__ == "__main__":
    sys.exit(main())
