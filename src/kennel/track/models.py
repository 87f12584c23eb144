"""Models in MLflow: the exported torch program of a run, and the registry with its ``champion`` alias."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np

from kennel.track.store import T, retry, store_lock

if TYPE_CHECKING:
    import torch

CHAMPION = "champion"  # the registry alias that marks the best version so far


def pinned(*packages: str) -> list[str]:
    """``package==version`` of the running stack, for a logged model's requirements (local build suffixes such as
    ``+cu130`` dropped: pip cannot install them)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in packages]


def log_model(model: torch.nn.Module, example: np.ndarray, name: str = "model") -> str:
    """Log the model as a torch.export program (MLflow's "pt2"); returns its ``models:/`` URI.

    The exported graph needs neither kennel nor pickle to load. ``example`` must hold at least two images: the
    exporter fixes a batch dimension of size 1 to a constant, and the model would then refuse other batch sizes.
    Requirements are given, not inferred: inference imports the model in a subprocess, which is slow. MLflow's
    check that the input example serves (loading the program back and running it, seconds on a CPU) is left to
    the tests, which load the logged model and compare its outputs.
    """
    import torch  # here: reading the registry (compare, predict by reference) needs no torch
    from mlflow.models import infer_signature

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
        pip_requirements=pinned("torch", "mlflow", "numpy"),
        validate_serving_input=False,
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
