"""The MLflow store and the run train and evaluate share: where the store is, first contact under a lock, writes
retried while the store is busy, and the run's params, metrics, tags and files.

The default store is ``sqlite:///<repo root>/mlflow.db`` with artifacts in ``<repo root>/mlruns``. The root is
``$DVC_ROOT`` when DVC sets it: a queued experiment runs in a copy under ``.dvc/tmp/exps/`` that is deleted
afterwards, so anything relative to its working directory would be lost. ``MLFLOW_TRACKING_URI`` overrides."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import mlflow.data
import pandas as pd
from mlflow.data.dataset_source_registry import get_registered_sources

from kennel.core.errors import TrackingUnavailable
from kennel.core.paths import tracking_uri
from kennel.core.versioning import git

log = logging.getLogger(__name__)


T = TypeVar("T")


# MLflow 3's UI opens an experiment of this kind on its runs, not on the GenAI overview (traces, token usage).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}






def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the URI, instead of after MLflow's minutes of retries."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as reply:
            reply.read()
    except (OSError, ValueError) as err:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: {err}. "
            "Start it, or unset MLFLOW_TRACKING_URI to use the project's sqlite store."
        ) from None


@contextmanager
def store_lock(root: Path) -> Iterator[None]:
    """Serialise first contact with a database store (sqlite, PostgreSQL, ...): parallel queued experiments would
    otherwise race to create its tables and the experiment ("table already exists", "database is locked"). A
    tracking server does that itself."""
    if tracking_uri(root).startswith(("http://", "https://", "databricks", "file:")):
        yield
        return
    with open(root / ".mlflow.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Transient store errors: sqlite's writer lock, and two writers inserting the same row at once (parallel runs logging
# the same dataset through a tracking server: the loser's retry finds the row and links it).
TRANSIENT = ("database is locked", "duplicate key value violates unique constraint", "UNIQUE constraint failed")


def retry(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """Call an MLflow write, retrying with backoff on a ``TRANSIENT`` store error."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - sqlalchemy's OperationalError arrives wrapped in several ways
            if not any(t in str(err) for t in TRANSIENT) or attempt == attempts - 1:
                raise
            time.sleep(min(8.0, 0.25 * 2**attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


def experiment_id(name: str, root: Path) -> str:
    """Id of experiment ``name``, created with its artifacts under ``root/mlruns`` for a local store."""
    uri = tracking_uri(root)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(root):
        found = retry(mlflow.get_experiment_by_name, name)
        if found is not None:
            return found.experiment_id
        local = uri.startswith(("sqlite:", "file:"))
        location = (root / "mlruns").as_uri() if local else None
        try:
            return retry(mlflow.create_experiment, name, artifact_location=location, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:
            # Another process (another machine, for a server) created it between the lookup and the create.
            return mlflow.get_experiment_by_name(name).experiment_id


@contextmanager
def open_run(
    root: Path, experiment: str, run_id: str | None = None, run_name: str | None = None,
    tags: Mapping[str, str] | None = None, system_metrics: bool = False,
) -> Iterator[str]:
    """Start (or, with ``run_id``, resume) a run; it ends FINISHED, or FAILED if the block raises.

    ``system_metrics`` samples CPU, memory, disk, network and (with nvidia-ml-py on an NVIDIA GPU) GPU use in a
    background thread while the run is open, logged as ``system/*`` metrics: the UI's "System metrics" tab.
    """
    exp_id = experiment_id(experiment, root)
    run = retry(mlflow.start_run, run_id=run_id, experiment_id=None if run_id else exp_id, run_name=run_name,
                tags=dict(tags or {}), log_system_metrics=system_metrics)
    with run:
        yield run.info.run_id


def find_experiment(root: Path, name: str) -> str | None:
    """Id of experiment ``name`` in the project's store, or None; creates nothing."""
    mlflow.set_tracking_uri(tracking_uri(root))
    found = mlflow.get_experiment_by_name(name)
    return found.experiment_id if found is not None else None


def run_exists(root: Path, run_id: str) -> bool:
    check_reachable(tracking_uri(root))
    mlflow.set_tracking_uri(tracking_uri(root))
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def find_run(root: Path, run_id: str) -> mlflow.entities.Run | None:
    """The run ``run_id`` of the project's store, or None when it has no such run."""
    mlflow.set_tracking_uri(tracking_uri(root))
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None


def run_tag(run_id: str, key: str) -> str:
    return retry(mlflow.MlflowClient().get_run, run_id).data.tags.get(key, "")


def run_tags_under(run_id: str, prefix: str) -> dict[str, str]:
    """The run's tags whose key starts with ``prefix``, by the rest of the key."""
    tags = retry(mlflow.MlflowClient().get_run, run_id).data.tags
    return {k.removeprefix(prefix): v for k, v in sorted(tags.items()) if k.startswith(prefix)}


def run_name(flat_params: Mapping[str, Any]) -> str:
    """The DVC experiment name when there is one, else the params that usually differ, and the commit."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    p = flat_params
    name = (
        f"{p['model.finetune']}-{p['train.optimizer']}-lr{p['train.lr']:g}-bs{p['train.batch_size']}"
        f"-e{p['train.epochs']}-s{p['resize.size']}"
    )
    commit = git(["rev-parse", "--short", "HEAD"], Path.cwd())
    return f"{name}@{commit}" if commit else name


def log_manifest(manifest: Path, name: str) -> None:
    """The manifest as the run's dataset input: the UI's Dataset column shows its name and digest."""
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    # A plain path matches two identical "local" sources in MLflow's registry, which warns; name the source.
    local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
    dataset = mlflow.data.from_pandas(frame, source=local(str(manifest.resolve())), name=name)
    retry(mlflow.log_input, dataset, context="training")


def log_params(flat_params: Mapping[str, Any]) -> None:
    retry(mlflow.log_params, dict(flat_params))


def set_tags(tags: Mapping[str, Any]) -> None:
    retry(mlflow.set_tags, {k: str(v) for k, v in tags.items()})


def note(text: str) -> None:
    """Shown as the run's description in the MLflow UI."""
    retry(mlflow.set_tag, "mlflow.note.content", text)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    retry(mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)


def log_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
    log_metrics(metrics, step=epoch)


def log_artifacts(paths: list[Path], artifact_path: str) -> None:
    for path in paths:
        retry(mlflow.log_artifact, str(path), artifact_path=artifact_path)


def log_dict(data: Mapping[str, Any], name: str) -> None:
    retry(mlflow.log_dict, dict(data), name)


def write_run_file(path: Path, run_id: str, root: Path) -> None:
    """The small DVC output that hands the run from train to evaluate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri(root)}, indent=2) + "\n")


def read_run_file(path: Path) -> str:
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError) as err:
        raise RuntimeError(f"{path}: no MLflow run id ({err}); run the train stage first (dvc repro train)") from None
