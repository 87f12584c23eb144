"""train: fine-tune resnet18 on the resized arrays; log params, curves and the model to a new MLflow run."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import numpy as np
import pandas as pd

from kennel import tracking
from kennel.config import Params
from kennel.data.tensors import read_split
from kennel.engine import amp_name
from kennel.model import save_model
from kennel.paths import DATA_SUMMARY, HISTORY, MODEL, REJECTS, RESIZED, RUN_FILE
from kennel.stage import run_stage
from kennel.training import TrainResult, train


def train_stage(params: Params) -> None:
    root = tracking.project_root()
    flat = params.flat()
    with tracking.open_run(root, params.mlflow.experiment, run_name=tracking.run_name(flat),
                           tags=tracking.provenance_tags(root)) as run_id:
        tracking.write_run_file(RUN_FILE, run_id, root)
        tracking.log_params(flat)
        summary = json.loads(DATA_SUMMARY.read_text())
        tracking.log_metrics({f"data_{k}": summary[k] for k in ("found", "kept", "rejected")})
        tracking.log_artifacts([DATA_SUMMARY, REJECTS], "data")

        def on_start(result: TrainResult) -> None:
            tracking.set_tags({
                "kennel.device": result.device, "kennel.amp": amp_name(result.amp_dtype),
                "kennel.weights": result.weights.source, "kennel.classes": ",".join(result.model.classes),
            })
            if result.weights.warning:
                tracking.set_tags({"kennel.weights_warning": result.weights.warning})
                tracking.note(f"Warning: {result.weights.warning}")

        result = train(params, RESIZED, on_epoch=lambda r: tracking.log_epoch(r.epoch, r.metrics()), on_start=on_start)
        save_model(result.model, MODEL, params.resize.size, params.model.arch)
        HISTORY.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([asdict(r) for r in result.history]).to_csv(HISTORY, index=False)
        images, _ = read_split(RESIZED, "train")
        model_uri = tracking.log_model(result.model, example=np.array(images[:2]))
        tracking.set_tags({"kennel.model_uri": model_uri})


def main(argv=None) -> int:
    return run_stage("train", train_stage, argv)


if __name__ == "__main__":
    sys.exit(main())
