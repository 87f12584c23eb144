"""The train stage's MLflow side: open (or continue) the run, record what it trains on, log every epoch, then the
model files. Training itself knows nothing of this: it reports through ``on_start`` and ``on_epoch``."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from kennel.core.device import amp_name
from kennel.core.params import Params
from kennel.core.paths import (
    AUDITED,
    CHECKPOINT,
    DATA_REPORT,
    DATA_SUMMARY,
    LIVE,
    MANIFEST,
    MODEL,
    REJECTS,
    RUN_FILE,
)
from kennel.core.versioning import workspace_unversioned_reason
from kennel.data.shards import read_meta, read_split
from kennel.model.file import save_model
from kennel.track import store
from kennel.track.live import LiveLog
from kennel.track.models import log_model
from kennel.track.provenance import provenance_tags
from kennel.track.serving import log_serving_model
from kennel.train.checkpoint import mark_complete
from kennel.train.distributed import Dist
from kennel.train.fine_tune import TrainResult, train
from kennel.train.loop import EpochResult

log = logging.getLogger(__name__)


def run_tags(params: Params, root: Path) -> dict[str, str]:
    """Provenance, plus whether the raw images are versioned with the commit (warned about when not)."""
    unversioned = workspace_unversioned_reason(Path.cwd(), params.data.source, params.data.raw_dir)
    tags = {**provenance_tags(root), "kennel.data_versioned": str(not unversioned).lower()}
    if unversioned:
        log.warning("the raw images are not versioned, so this run is not reproducible from its commit: %s",
                    unversioned)
        tags["kennel.data_warning"] = f"not reproducible from its commit: {unversioned}"
    return tags


def log_inputs(params: Params) -> None:
    """What a fresh run trains with: params, the data counts and look, and the manifest as the run's dataset."""
    store.log_params(params.flat())
    summary = json.loads(DATA_SUMMARY.read_text())
    store.log_metrics({f"data_{k}": summary[k] for k in ("found", "kept", "rejected")})
    # The splits trained on are the audited ones: near-copies moved into one split differ from the summary's.
    audited = read_meta(AUDITED)
    store.log_metrics({**{f"data_{split}": n for split, n in audited["counts"].items()},
                       "audit_moved_images": audited.get("moved", 0)})
    store.log_artifacts([DATA_SUMMARY, REJECTS, *sorted(DATA_REPORT.glob("*"))], "data")
    d = params.data
    store.log_manifest(MANIFEST, f"{d.source}:{d.raw_dir}" if d.source != "synthetic" else "synthetic")


def log_start(result: TrainResult, world: int) -> None:
    """Where and how it trains, once the model is built: device, precision, weights, classes, placement."""
    store.set_tags({
        "kennel.device": result.device, "kennel.amp": amp_name(result.amp_dtype), **result.weights.tags(),
        "kennel.classes": ",".join(result.model.classes), "kennel.data_placement": result.data_placement,
        "kennel.processes": world, "kennel.epochs": result.epochs,
        **{f"kennel.decision.{k}": v for k, v in result.decisions.items()},
    })
    if result.resumed_from:
        store.set_tags({"kennel.resumed_from_epoch": result.resumed_from})
    if result.weights.warning:
        store.set_tags({"kennel.weights_warning": result.weights.warning})
        store.note(f"Warning: {result.weights.warning}")


def save_and_log_model(result: TrainResult, params: Params) -> None:
    """The model file (a DVC output), then the exported model and the servable classifier."""
    store.set_tags({"kennel.selected_epoch": result.selected_epoch, "kennel.selected_reason": result.selected_reason,
                    "kennel.tta": result.tta,
                    **{f"kennel.decision.{k}": v for k, v in result.decisions.items()}})  # the blend's, now
    store.log_metrics(result.baseline_metrics())
    if result.blended_val is not None and not math.isnan(result.blended_val[0]):  # NaN: no val split to score on
        store.log_metrics(dict(zip(("blended_val_loss", "blended_val_accuracy"), result.blended_val, strict=True)))
    if result.ensemble_val is not None and not math.isnan(result.ensemble_val[0]):
        store.log_metrics(dict(zip(("ensemble_val_loss", "ensemble_val_accuracy"), result.ensemble_val, strict=True)))
    warning = result.below_baseline()
    if warning:
        log.warning("%s", warning)
        store.set_tags({"kennel.baseline_warning": warning})
    result.model.tta = result.tta  # stored with the model: evaluate, predict and serving repeat it
    save_model(result.model, MODEL, size=params.resize.size, arch=params.model.arch, mode=params.resize.mode)
    images, _ = read_split(AUDITED, "train")
    model_uri = log_model(result.model, example=np.array(images[:2]))
    serving_uri = store.retry(log_serving_model, MODEL)  # the one the registry and `mlflow models serve` use
    store.set_tags({"kennel.model_uri": model_uri, "kennel.serving_uri": serving_uri})


def train_and_log(params: Params, root: Path, *, resume: dict | None = None, ctx: Dist | None = None) -> TrainResult:
    """Train per ``params`` inside an MLflow run (the resumed run's own when ``resume`` names one that exists),
    checkpointing every epoch and logging each to MLflow and DVCLive (same numbers, step = epoch); write the
    model files and log them; mark the checkpoint complete."""
    ctx = ctx or Dist()
    run_id = resume.get("mlflow_run_id") if resume else None
    if run_id and not store.run_exists(root, run_id):
        run_id = None
    with store.open_run(root, params.mlflow.experiment, run_id=run_id, run_name=store.run_name(params.flat()),
                  tags=run_tags(params, root), system_metrics=params.mlflow.system_metrics) as run_id:
        store.write_run_file(RUN_FILE, run_id, root)
        if resume is None:
            log_inputs(params)
        live = LiveLog(LIVE, resume["epoch"] if resume else None)

        def on_epoch(r: EpochResult) -> None:
            store.log_epoch(r.epoch, r.metrics())
            live.log_epoch(r)

        result = train(params, AUDITED, on_epoch=on_epoch,
                       on_start=lambda r: log_start(r, ctx.world), checkpoint=CHECKPOINT, resume=resume,
                       checkpoint_extra={"mlflow_run_id": run_id}, ctx=ctx)
        live.finish(result)
        save_and_log_model(result, params)
    mark_complete(CHECKPOINT)
    return result
