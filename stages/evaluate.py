"""evaluate: score the trained model on the test split; write DVC metrics/plots and log them to the train run."""

from __future__ import annotations

import json
import sys

import numpy as np

from kennel import tracking
from kennel.config import Params
from kennel.evaluation import evaluate_model
from kennel.figures import confusion_png, roc_png
from kennel.metrics import auc
from kennel.model import WeightsError
from kennel.paths import CONFUSION, FIGURES, METRICS, MODEL, RESIZED, ROC, RUN_FILE
from kennel.stage import run_stage


def evaluate_stage(params: Params) -> None:
    run_id = tracking.read_run_file(RUN_FILE)
    result = evaluate_model(MODEL, RESIZED, device=params.train.device, amp=params.train.amp)
    m = result.metrics
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    METRICS.write_text(json.dumps({"test": m}, indent=2) + "\n")
    result.confusion_rows().to_csv(CONFUSION, index=False)
    figures = [confusion_png(np.array(m["confusion_matrix"]), result.classes, FIGURES / "confusion_matrix.png")]
    roc = result.roc()
    if roc is not None:
        roc.to_csv(ROC, index=False)
        fpr, tpr = roc["fpr"].to_numpy(), roc["tpr"].to_numpy()
        figures.append(roc_png(fpr, tpr, auc(fpr, tpr), FIGURES / "roc.png"))
    else:
        ROC.write_text("fpr,tpr,threshold\n")  # declared output; multi-class has no single ROC

    scalars = {"test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"]}
    if "roc_auc" in m:
        scalars["test_roc_auc"] = m["roc_auc"]
    for name, r in m["per_class"].items():
        scalars.update({f"test_{k}_{name}": r[k] for k in ("precision", "recall", "f1")})
    root = tracking.project_root()
    with tracking.open_run(root, params.mlflow.experiment, run_id=run_id):
        tracking.log_metrics(scalars)
        tracking.log_dict(m, "evaluation/metrics.json")
        tracking.log_artifacts(figures + [CONFUSION, ROC], "evaluation")
        mf = params.mlflow
        if mf.registered_model:
            model_uri = tracking.run_tag(run_id, "kennel.serving_uri") or tracking.run_tag(run_id, "kennel.model_uri")
            reg = tracking.register_and_promote(root, run_id, model_uri, mf.registered_model, mf.promote_if_better)
            tracking.set_tags({"kennel.registered_version": reg.version, "kennel.promoted": str(reg.promoted).lower()})
            print(f"registered {mf.registered_model} version {reg.version}; "
                  f"{'now' if reg.promoted else 'not'} champion ({reg.reason})")
    print(f"test accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}"
          + (f"  ROC AUC {m['roc_auc']:.4f}" if "roc_auc" in m else ""))


def main(argv=None) -> int:
    return run_stage("evaluate", evaluate_stage, argv, extra_errors=(tracking.TrackingUnavailable, WeightsError))


if __name__ == "__main__":
    sys.exit(main())
