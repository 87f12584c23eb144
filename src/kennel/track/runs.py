"""Train runs as a person names them: a run id, a DVC experiment name, a git commit, or ``champion``; and what a
comparison reads of each (params, metrics, tags, per-epoch history, the test predictions)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from kennel.core.errors import ModelRefError
from kennel.core.versioning import RUN_ID, git
from kennel.track.models import CHAMPION
from kennel.track.refs import client, get_run

CURVES = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


@dataclass
class RunView:
    """One train run, as ``kennel compare`` shows it."""

    ref: str
    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (epoch, value)
    predictions: pd.DataFrame | None = None  # evaluation/predictions.csv, when the run was evaluated


def find_train_run(ref: str, root: Path, experiment: str, registered_model: str) -> str:
    """The run id ``ref`` names: a run id; ``champion`` (the registry's alias); a DVC experiment name; or a git
    commit-ish (the newest train run made from it). Reproductions and lr-find runs are never picked for a name."""
    store = client(root, ref)
    if RUN_ID.fullmatch(ref):
        return ref
    if ref == CHAMPION:
        try:
            return store.get_model_version_by_alias(registered_model, CHAMPION).run_id
        except MlflowException as err:
            raise ModelRefError(f"{ref!r}: no {CHAMPION} of registered model {registered_model!r} ({err.message})"
                                ) from None
    found = store.get_experiment_by_name(experiment)
    if found is None:
        raise ModelRefError(f"{ref!r}: no MLflow experiment {experiment!r} in this project's store")
    plain = "attributes.status = 'FINISHED'"
    candidates = [f"tags.`dvc.exp_name` = '{ref}'"]
    commit = git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], root)
    if commit:
        candidates.append(f"tags.`git.commit` = '{commit}'")
    for where in candidates:
        runs = [r for r in store.search_runs([found.experiment_id], f"{plain} and {where}",
                                              order_by=["attributes.start_time DESC"])
                if "kennel.reproduces" not in r.data.tags and r.data.tags.get("kennel.kind") != "lr-find"]
        if runs:
            return runs[0].info.run_id
    raise ModelRefError(f"{ref!r}: neither a run id, {CHAMPION}, a DVC experiment name nor a commit with a "
                        f"finished train run in experiment {experiment!r}")


def load_run(ref: str, run_id: str, root: Path) -> RunView:
    """Params, metrics, tags, the per-epoch curves and the test predictions of ``run_id``."""
    run, store = get_run(run_id, root, ref), client(root, ref)
    history = {key: [(m.step, m.value) for m in store.get_metric_history(run_id, key)] for key in CURVES}
    view = RunView(ref, run_id, run.data.tags.get("mlflow.runName", run_id[:8]), dict(run.data.params),
                   dict(run.data.metrics), dict(run.data.tags), history)
    try:
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/evaluation/predictions.csv")
        view.predictions = pd.read_csv(io.StringIO(text))
    except Exception:  # noqa: BLE001 - a run that was never evaluated has no predictions; the rest still compares
        view.predictions = None
    return view
