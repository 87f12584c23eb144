"""Models named by MLflow reference: a run id, ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a logged
model ``models:/m-...``, loaded with the classes, size and resize mode their run recorded, or the run's files (its
kennel model file, its ONNX model). torch is imported only to load a PyTorch model: the ONNX path runs without it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.exceptions import MlflowException

from kennel.core.errors import ModelRefError, TrackingUnavailable
from kennel.track.store import check_reachable, tracking_uri

if TYPE_CHECKING:
    from kennel.model.inference import LoadedModel


def client(root: Path, ref: str) -> mlflow.MlflowClient:
    """The project store's client; a missing sqlite store or a server that is down is a ModelRefError naming ``ref``."""
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        # sqlite would silently create an empty store and then report the run as missing
        raise ModelRefError(f"{ref!r}: no MLflow store at {uri.removeprefix('sqlite:///')}; run `dvc repro` first")
    try:
        check_reachable(uri)  # a server that is down: seconds, not MLflow's minutes of retries
    except TrackingUnavailable as err:
        raise ModelRefError(f"{ref!r}: {err}") from None
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient()


def registered_run_id(ref: str, root: Path) -> str:
    """The run behind ``models:/name@alias``, ``models:/name/<version>`` or a logged model ``models:/m-...``."""
    store = client(root, ref)
    target = ref.removeprefix("models:/")
    name, _, version = target.partition("/")
    try:
        if "@" in target and not version:
            name, _, alias = target.partition("@")
            run_id = store.get_model_version_by_alias(name, alias).run_id
        elif version:
            run_id = store.get_model_version(name, version).run_id
        elif target.startswith("m-"):
            run_id = store.get_logged_model(target).source_run_id
        else:
            raise ModelRefError(f"{ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    except MlflowException as err:
        raise ModelRefError(f"{ref!r}: not found in the MLflow store ({err.message})") from None
    if not run_id:
        raise ModelRefError(f"{ref!r}: the model version has no source run to read classes and size from")
    return run_id


def get_run(run_id: str, root: Path, ref: str) -> mlflow.entities.Run:
    """The run ``run_id`` of the project's store; a ModelRefError naming ``ref`` when there is none."""
    try:
        return client(root, ref).get_run(run_id)
    except MlflowException as err:
        raise ModelRefError(f"{ref!r}: no such MLflow run {run_id} ({err.message})") from None


def load_logged_model(run_id: str, root: Path, ref: str) -> LoadedModel:
    """The model a kennel train run logged; its tags and params say the classes, size and resize mode."""
    import mlflow.pytorch

    from kennel.model.inference import DEFAULT_MODE, LoadedModel

    run = get_run(run_id, root, ref)
    tags, params = run.data.tags, run.data.params
    missing = [f"tag {k}" for k in ("kennel.model_uri", "kennel.classes") if not tags.get(k)]
    missing += [] if params.get("resize.size") else ["param resize.size"]
    if missing:
        raise ModelRefError(f"{ref!r}: run {run_id} lacks {', '.join(missing)}; is it a finished kennel train run?")
    try:  # downloaded into a folder of ours, gone once loaded (MLflow's own temp folder would stay behind)
        with tempfile.TemporaryDirectory(prefix="kennel-model-") as scratch:
            module = mlflow.pytorch.load_model(tags["kennel.model_uri"], dst_path=scratch, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - a deleted artifact, a store moved away, ...
        raise ModelRefError(f"{ref!r}: cannot load {tags['kennel.model_uri']} ({type(err).__name__}: {err})") from None
    classes = tags["kennel.classes"].split(",")
    mode = params.get("resize.mode", DEFAULT_MODE)
    return LoadedModel(module, classes, int(params["resize.size"]), mode, f"{ref} ({tags['kennel.model_uri']})")


def download_model_file(run_id: str, root: Path, ref: str, dest: Path) -> Path:
    """The kennel model file (``models/model.pt``) a train run logged inside its servable classifier, downloaded
    under ``dest``; a ModelRefError naming ``ref`` when the run has none."""
    run = get_run(run_id, root, ref)
    uri = run.data.tags.get("kennel.serving_uri")
    if not uri:
        raise ModelRefError(f"{ref!r}: run {run_id} has no model file (no tag kennel.serving_uri); is it a finished "
                            "kennel train run?")
    found = sorted((_download(uri, ref, dest) / "artifacts").glob("*.pt"))
    if not found:
        raise ModelRefError(f"{ref!r}: {uri} holds no kennel model file")
    return found[0]


def download_onnx_file(run_id: str, root: Path, ref: str, dest: Path) -> Path:
    """The ONNX model the export stage logged to train run ``run_id`` (tag ``kennel.onnx_uri``), downloaded under
    ``dest``; a ModelRefError naming ``ref`` when the run has none."""
    uri = get_run(run_id, root, ref).data.tags.get("kennel.onnx_uri")
    if not uri:
        raise ModelRefError(f"{ref!r}: run {run_id} has no ONNX model (no tag kennel.onnx_uri): the export stage "
                            "logs one (`dvc repro export`), or pass an .onnx file `kennel export` wrote")
    return _download(uri, ref, dest)


def _download(uri: str, ref: str, dest: Path) -> Path:
    """The artifact ``uri`` downloaded under ``dest``; a ModelRefError naming ``ref`` when it cannot be."""
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as err:  # noqa: BLE001 - a deleted artifact, a store moved away, ...
        raise ModelRefError(f"{ref!r}: cannot download {uri} ({type(err).__name__}: {err})") from None
