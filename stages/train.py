"""train: fine-tune a torchvision classifier on the resized arrays; log params, curves and the model to an MLflow run.

Resumes from ``models/checkpoint.pt`` when an unfinished run left it with the same params, data and code
(continuing the same MLflow run), and launches itself under torchrun when ``train.nproc`` > 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from kennel import track
from kennel.core.device import amp_name, resolve_device
from kennel.core.params import Params
from kennel.core.paths import (
    CHECKPOINT,
    DATA_REPORT,
    DATA_SUMMARY,
    HISTORY,
    MANIFEST,
    MODEL,
    REJECTS,
    RESIZED,
    RUN_FILE,
    project_root,
)
from kennel.core.stage import run_stage
from kennel.core.versioning import workspace_unversioned_reason
from kennel.data.shards import read_meta, read_split
from kennel.track.serving import log_serving_model
from kennel.train import distributed
from kennel.train.checkpoint import mark_complete
from kennel.train.fine_tune import TrainResult, find_resumable, train
from kennel.train.model import read_weights, save_model

log = logging.getLogger("kennel.train")


def train_stage(params: Params, argv: list[str]) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 talks to MLflow: fail before any training if it cannot
        track.check_reachable(track.tracking_uri(project_root()))
    if params.model.weights not in ("auto", "none"):
        # a weights file that does not fit stops here: nothing trained, nothing written, no MLflow run
        read_weights(params.model.arch, params.model.weights, len(read_meta(RESIZED)["classes"]))
    if params.train.nproc > 1 and not distributed.launched():
        code = distributed.relaunch(params.train.nproc, __file__, argv)
        if code:
            raise SystemExit(code)
        return
    ctx = distributed.setup(resolve_device(params.train.device).type)
    try:
        resume = find_resumable(CHECKPOINT, params, RESIZED)
        if ctx.is_main:
            _train_and_log(params, ctx, resume)
        else:
            train(params, RESIZED, checkpoint=CHECKPOINT, resume=resume, ctx=ctx)
    finally:
        distributed.cleanup()


def _train_and_log(params: Params, ctx: distributed.Dist, resume: dict | None) -> None:
    root = project_root()
    flat = params.flat()
    run_id = resume.get("mlflow_run_id") if resume else None
    if run_id and not track.run_exists(root, run_id):
        run_id = None
    unversioned = workspace_unversioned_reason(Path.cwd(), params.data.source, params.data.raw_dir)
    tags = {**track.provenance_tags(root), "kennel.data_versioned": str(not unversioned).lower()}
    if unversioned:
        log.warning("the raw images are not versioned, so this run is not reproducible from its commit: %s",
                    unversioned)
        tags["kennel.data_warning"] = f"not reproducible from its commit: {unversioned}"
    with track.open_run(root, params.mlflow.experiment, run_id=run_id, run_name=track.run_name(flat),
                           tags=tags, system_metrics=params.mlflow.system_metrics) as run_id:
        track.write_run_file(RUN_FILE, run_id, root)
        if resume is None:
            track.log_params(flat)
            summary = json.loads(DATA_SUMMARY.read_text())
            track.log_metrics({f"data_{k}": summary[k] for k in ("found", "kept", "rejected")})
            track.log_artifacts([DATA_SUMMARY, REJECTS, *sorted(DATA_REPORT.glob("*"))], "data")
            track.log_manifest(MANIFEST, f"{params.data.source}:{params.data.raw_dir}"
                                  if params.data.source != "synthetic" else "synthetic")

        def on_start(result: TrainResult) -> None:
            track.set_tags({
                "kennel.device": result.device, "kennel.amp": amp_name(result.amp_dtype),
                **result.weights.tags(), "kennel.classes": ",".join(result.model.classes),
                "kennel.data_placement": result.data_placement, "kennel.processes": ctx.world,
            })
            if result.resumed_from:
                track.set_tags({"kennel.resumed_from_epoch": result.resumed_from})
            if result.weights.warning:
                track.set_tags({"kennel.weights_warning": result.weights.warning})
                track.note(f"Warning: {result.weights.warning}")

        result = train(params, RESIZED, on_epoch=lambda r: track.log_epoch(r.epoch, r.metrics()),
                       on_start=on_start, checkpoint=CHECKPOINT, resume=resume,
                       checkpoint_extra={"mlflow_run_id": run_id}, ctx=ctx)
        track.set_tags({"kennel.selected_epoch": result.selected_epoch, "kennel.tta": params.evaluate.tta})
        result.model.tta = params.evaluate.tta  # stored with the model: evaluate, predict and serving repeat it
        save_model(result.model, MODEL, size=params.resize.size, arch=params.model.arch, mode=params.resize.mode)
        HISTORY.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([asdict(r) for r in result.history]).to_csv(HISTORY, index=False)
        images, _ = read_split(RESIZED, "train")
        model_uri = track.log_model(result.model, example=np.array(images[:2]))
        serving_uri = track.retry(log_serving_model, MODEL)  # the one the registry and `mlflow models serve` use
        track.set_tags({"kennel.model_uri": model_uri, "kennel.serving_uri": serving_uri})
    mark_complete(CHECKPOINT)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_stage("train", lambda params: train_stage(params, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
