"""Everything MLflow: where the store is, the run that train and evaluate share, tags, metrics, the model.

The default store is ``sqlite:///<repo root>/mlflow.db`` with artifacts in ``<repo root>/mlruns``. The root is
``$DVC_ROOT`` when DVC sets it: a queued experiment runs in a copy under ``.dvc/tmp/exps/`` that is deleted
afterwards, so anything relative to its working directory would be lost. ``MLFLOW_TRACKING_URI`` overrides.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

# Before mlflow is imported: no "Downloading artifacts" bars in stage output (logging a model reads files back).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import mlflow.data  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import yaml  # noqa: E402
from mlflow.data.dataset_source_registry import get_registered_sources  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402

import kennel  # noqa: E402

log = logging.getLogger(__name__)
# MLflow's own INFO lines (table creation, system metrics monitor start/stop) would drown kennel's; its warnings stay.
logging.getLogger("mlflow").setLevel(logging.WARNING)
T = TypeVar("T")
CHAMPION = "champion"  # the registry alias that marks the best version so far
# MLflow 3's UI opens an experiment of this kind on its runs, not on the GenAI overview (traces, token usage).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer; raised before any training starts."""


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


def run_tag(run_id: str, key: str) -> str:
    return retry(mlflow.MlflowClient().get_run, run_id).data.tags.get(key, "")


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
    """Code, data and environment identity, so a run can be traced back to what made it."""
    here = Path.cwd()
    tags = {
        "kennel.version": kennel.__version__,
        "torch.version": torch.__version__,
        "torchvision.version": torchvision.__version__,
        "cuda.version": torch.version.cuda or "none",
        "host.python": platform.python_version(),
        "host.device": device_name(),
    }
    # In a DVC experiment the workspace sits on a temporary commit; the baseline is the one the repo keeps.
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git(["rev-parse", "HEAD"], here)
    if commit:
        changed = [f for f in _git(["diff", "--name-only", commit], here).splitlines() if not _is_result(f, here)]
        tags.update({
            "mlflow.source.git.commit": commit,
            "git.commit": commit,
            "git.branch": _git(["rev-parse", "--abbrev-ref", "HEAD"], here),
            "git.dirty": str(bool(changed)).lower(),
        })
        if changed:
            tags["git.changed_files"] = ", ".join(changed)[:5000]
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
                     ("KENNEL_REPRODUCES", "kennel.reproduces")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags.update(data_fingerprint(here / "dvc.lock"))
    return tags


def _is_result(path: str, workspace: Path) -> bool:
    """Files that differ from the commit without making the code differ: params (recorded on the run), the
    lock, the .gitignore entries DVC keeps for outputs, and pipeline outputs being rewritten (reports, plots)."""
    if path in ("params.yaml", "dvc.lock") or Path(path).name == ".gitignore":
        return True
    return any(path == out or path.startswith(out.rstrip("/") + "/") for out in _pipeline_outputs(workspace))


def _pipeline_outputs(workspace: Path) -> list[str]:
    try:
        stages = yaml.safe_load((workspace / "dvc.yaml").read_text()).get("stages", {})
    except (OSError, AttributeError, yaml.YAMLError):
        return []
    outs = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) or []:
                outs.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return outs


def data_fingerprint(lock: Path) -> dict[str, str]:
    """The dvc.lock hashes of the data outputs a run used: the same hash means the same bytes."""
    try:
        stages = yaml.safe_load(lock.read_text()).get("stages", {})
    except (OSError, AttributeError, yaml.YAMLError):
        return {}
    tags = {}
    for stage in ("prepare", "resize"):
        for out in stages.get(stage, {}).get("outs", []):
            if out.get("path", "").startswith("data/") and out.get("md5"):
                tags[f"dvc.data.{out['path']}"] = out["md5"]
    return tags


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return platform.processor() or "cpu"


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
    info = retry(
        mlflow.pytorch.log_model,
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


@dataclass(frozen=True)
class Registration:
    version: str
    promoted: bool
    reason: str


def register_and_promote(
    root: Path, run_id: str, model_uri: str, name: str, promote: bool, metric: str = "test_accuracy"
) -> Registration:
    """Register ``model_uri`` as a new version of ``name``, tagged back to its run and commit; with ``promote``,
    move the ``champion`` alias to it when its ``metric`` beats the current champion's (or there is none)."""
    client = mlflow.MlflowClient()
    run = retry(client.get_run, run_id)
    links = {k: run.data.tags[k] for k in ("git.commit", "dvc.exp_name", "mlflow.runName") if k in run.data.tags}
    value = run.data.metrics.get(metric)
    with store_lock(root):  # compare-and-move must not interleave with another run's
        version = _without_registry_chatter(
            retry, mlflow.register_model, model_uri, name,
            tags={"run_id": run_id, **links, metric: "" if value is None else f"{value:.6g}"}).version
        version = str(version)
        if not promote or value is None:
            return Registration(version, False, "promotion off" if not promote else f"run has no {metric}")
        try:
            champion = client.get_model_version_by_alias(name, CHAMPION)
            best = client.get_run(champion.run_id).data.metrics.get(metric) if champion.run_id else None
        except mlflow.exceptions.MlflowException:
            champion, best = None, None
        if champion is not None and best is not None and value <= best:
            return Registration(version, False, f"{metric} {value:.4g} <= champion v{champion.version}'s {best:.4g}")
        retry(client.set_registered_model_alias, name, CHAMPION, version)
    was = f"champion v{champion.version}'s {best:.4g}" if champion is not None and best is not None else "no champion"
    return Registration(version, True, f"{metric} {value:.4g} > {was}")


# What mlflow.register_model prints on stderr about each registration; the stage logs its own line instead.
_REGISTRY_CHATTER = ("Successfully registered model", "Created version", "Registered model")


def _without_registry_chatter(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(...)`` with MLflow's registration messages dropped; anything else it wrote to stderr is passed on."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return fn(*args, **kwargs)
    finally:
        rest = [line for line in captured.getvalue().splitlines() if line and not line.startswith(_REGISTRY_CHATTER)]
        if rest:
            print("\n".join(rest), file=sys.stderr)


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
