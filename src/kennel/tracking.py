"""Everything MLflow: where the store is, the run that train and evaluate share, tags, metrics, the model.

The default store is ``sqlite:///<repo root>/mlflow.db`` with artifacts in ``<repo root>/mlruns``. The root is
``$DVC_ROOT`` when DVC sets it: a queued experiment runs in a copy under ``.dvc/tmp/exps/`` that is deleted
afterwards, so anything relative to its working directory would be lost. ``MLFLOW_TRACKING_URI`` overrides.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import torchvision
from mlflow.models import infer_signature

import kennel

log = logging.getLogger(__name__)


def project_root(start: Path | None = None) -> Path:
    """``$DVC_ROOT`` if set, else the nearest folder up from ``start`` (cwd) holding ``.dvc`` or ``.git``."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def experiment_id(name: str, root: Path) -> str:
    """Id of experiment ``name``, created with its artifacts under ``root/mlruns`` for a local store."""
    mlflow.set_tracking_uri(tracking_uri(root))
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    local = not os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(root).startswith(("sqlite:", "file:"))
    location = (root / "mlruns").as_uri() if local else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create (parallel queued experiments).
        return mlflow.get_experiment_by_name(name).experiment_id


@contextmanager
def open_run(
    root: Path, experiment: str, run_id: str | None = None, run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Start (or, with ``run_id``, resume) a run; it ends FINISHED, or FAILED if the block raises."""
    mlflow.set_tracking_uri(tracking_uri(root))
    exp_id = experiment_id(experiment, root) if run_id is None else None
    with mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=run_name, tags=dict(tags or {})) as run:
        yield run.info.run_id


def run_exists(root: Path, run_id: str) -> bool:
    mlflow.set_tracking_uri(tracking_uri(root))
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def run_name(flat_params: Mapping[str, Any]) -> str:
    """The DVC experiment name when there is one, else the params that usually differ, and the commit."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    p = flat_params
    name = (
        f"{p['model.finetune']}-{p['train.optimizer']}-lr{p['train.lr']:g}-bs{p['train.batch_size']}"
        f"-e{p['train.epochs']}-s{p['resize.size']}"
    )
    commit = _git(["rev-parse", "--short", "HEAD"], Path.cwd())
    return f"{name}@{commit}" if commit else name


def provenance_tags(root: Path) -> dict[str, str]:
    """Git commit and DVC experiment identity, so a run can be traced back to code, data and params."""
    tags = {
        "kennel.version": kennel.__version__,
        "torch.version": torch.__version__,
        "torchvision.version": torchvision.__version__,
        "host.python": platform.python_version(),
    }
    commit = _git(["rev-parse", "HEAD"], Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.commit"] = commit
        tags["git.dirty"] = str(bool(_git(["status", "--porcelain", "--untracked-files=no"], Path.cwd()))).lower()
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def log_params(flat_params: Mapping[str, Any]) -> None:
    mlflow.log_params(dict(flat_params))


def set_tags(tags: Mapping[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def note(text: str) -> None:
    """Shown as the run's description in the MLflow UI."""
    mlflow.set_tag("mlflow.note.content", text)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
    log_metrics(metrics, step=epoch)


def log_artifacts(paths: list[Path], artifact_path: str) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(data: Mapping[str, Any], name: str) -> None:
    mlflow.log_dict(dict(data), name)


def log_model(model: torch.nn.Module, example: np.ndarray, name: str = "model") -> str:
    """Log the model as a torch.export program (MLflow's "pt2"); returns its ``models:/`` URI.

    The exported graph needs neither kennel nor pickle to load. ``example`` must hold at least two images: the
    exporter fixes a batch dimension of size 1 to a constant, and the model would then refuse other batch sizes.
    Requirements are given, not inferred: inference imports the model in a subprocess, which is slow.
    """
    if len(example) < 2:
        example = np.concatenate([example, example])[:2]
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name=name,
        signature=infer_signature(example, output),
        input_example=example,
        serialization_format="pt2",
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}",
        ],
    )
    return info.model_uri


def write_run_file(path: Path, run_id: str, root: Path) -> None:
    """The small DVC output that hands the run from train to evaluate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri(root)}, indent=2) + "\n")


def read_run_file(path: Path) -> str:
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError) as err:
        raise RuntimeError(f"{path}: no MLflow run id ({err}); run the train stage first (dvc repro train)") from None


def _git(args: list[str], cwd: Path) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
