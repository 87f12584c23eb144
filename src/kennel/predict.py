"""``kennel predict``: class probabilities for image files and folders, from a model file or an MLflow model.

Every file goes through ``kennel.data.images.load_array`` with the model's own size and resize mode, the same call
the resize stage makes, so a file gives the model exactly the tensor it would have had at train time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from kennel.data.images import load_array
from kennel.metrics import softmax
from kennel.model import load_model
from kennel.paths import MODEL

DEFAULT_MODE = "center_crop"  # model files written before the mode was stored were made with the default
RUN_ID = re.compile(r"[0-9a-f]{32}")


class ModelRefError(ValueError):
    """A ``--model`` reference that cannot be resolved; the message names it and says why."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference: uint8 N x 3 x S x S -> logits, with what it needs to preprocess files."""

    module: nn.Module  # already in eval mode (an exported program cannot be switched, it is exported in it)
    classes: list[str]
    size: int
    mode: str = DEFAULT_MODE
    source: str = ""  # where it came from, for messages


def load_model_file(path: Path) -> LoadedModel:
    """A kennel model file (``models/model.pt``): weights, classes, input size and resize mode."""
    model, size = load_model(path)
    # mmap: only the small entries are read, not the weights a second time
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return LoadedModel(model, list(model.classes), size, str(payload.get("mode", DEFAULT_MODE)), str(path))


def resolve_model(ref: str | None, root: Path) -> LoadedModel:
    """``ref``: None (``models/model.pt`` under ``root``), a model file, an MLflow run id, or a registered model
    ``models:/name@alias`` / ``models:/name/<version>`` (also a logged model ``models:/m-...``).

    Raises ModelRefError naming ``ref`` when it leads to no usable model.
    """
    if ref is None:
        path = root / MODEL
        if not path.is_file():
            raise ModelRefError(f"{path}: no model file; run `dvc repro train` first, or pass --model")
        return _load_file(path, str(path))
    if ref.startswith("models:/"):
        return _load_run(_registered_run_id(ref, root), root, ref)
    path = Path(ref)
    if path.is_file():
        return _load_file(path, ref)
    if path.exists():
        raise ModelRefError(f"{ref!r}: a folder, not a model file")
    if not RUN_ID.fullmatch(ref):
        raise ModelRefError(f"{ref!r}: no such model file, and not an MLflow run id or models:/ URI")
    return _load_run(ref, root, ref)


def _load_file(path: Path, ref: str) -> LoadedModel:
    try:
        return load_model_file(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ModelRefError(f"{ref!r}: not a kennel model file ({type(err).__name__}: {err})") from None


def _client(root: Path, ref: str):
    # mlflow is imported here, not at the top: predicting from a model file never needs it.
    import mlflow

    from kennel.tracking import TrackingUnavailable, check_reachable, tracking_uri

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


def _registered_run_id(ref: str, root: Path) -> str:
    """The run behind ``models:/name@alias``, ``models:/name/<version>`` or a logged model ``models:/m-...``."""
    from mlflow.exceptions import MlflowException

    client = _client(root, ref)
    target = ref.removeprefix("models:/")
    name, _, version = target.partition("/")
    try:
        if "@" in target and not version:
            name, _, alias = target.partition("@")
            run_id = client.get_model_version_by_alias(name, alias).run_id
        elif version:
            run_id = client.get_model_version(name, version).run_id
        elif target.startswith("m-"):
            run_id = client.get_logged_model(target).source_run_id
        else:
            raise ModelRefError(f"{ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    except MlflowException as err:
        raise ModelRefError(f"{ref!r}: not found in the MLflow store ({err.message})") from None
    if not run_id:
        raise ModelRefError(f"{ref!r}: the model version has no source run to read classes and size from")
    return run_id


def _load_run(run_id: str, root: Path, ref: str) -> LoadedModel:
    """The model a kennel train run logged; its tags and params say the classes, size and resize mode."""
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    client = _client(root, ref)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ModelRefError(f"{ref!r}: no such MLflow run {run_id} ({err.message})") from None
    tags, params = run.data.tags, run.data.params
    missing = [f"tag {k}" for k in ("kennel.model_uri", "kennel.classes") if not tags.get(k)]
    missing += [] if params.get("resize.size") else ["param resize.size"]
    if missing:
        raise ModelRefError(f"{ref!r}: run {run_id} lacks {', '.join(missing)}; is it a finished kennel train run?")
    try:
        module = mlflow.pytorch.load_model(tags["kennel.model_uri"], map_location="cpu")
    except Exception as err:  # noqa: BLE001 - a deleted artifact, a store moved away, ...
        raise ModelRefError(f"{ref!r}: cannot load {tags['kennel.model_uri']} ({type(err).__name__}: {err})") from None
    classes = tags["kennel.classes"].split(",")
    mode = params.get("resize.mode", DEFAULT_MODE)
    return LoadedModel(module, classes, int(params["resize.size"]), mode, f"{ref} ({tags['kennel.model_uri']})")


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by every file under them (recursive, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return files


def preprocess(path: str | Path, model: LoadedModel) -> np.ndarray:
    """``path`` -> uint8 (3, S, S): the resize stage's preprocessing with the model's size and mode."""
    return load_array(path, model.size, model.mode)


def predict_arrays(images: np.ndarray, model: LoadedModel, batch_size: int = 32) -> np.ndarray:
    """uint8 N x 3 x S x S -> class probabilities N x C (float64)."""
    logits = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            logits.append(model.module(batch).float().numpy())
    if not logits:
        return np.empty((0, len(model.classes)))
    return softmax(np.concatenate(logits).astype(np.float64))


def result_frame(probs: np.ndarray, errors: Sequence[str], classes: Sequence[str]) -> pd.DataFrame:
    """``class``, ``error``, ``p_<class>`` per row; rows with an error have no class and NaN probabilities."""
    ok = np.array([not e for e in errors], dtype=bool)
    full = np.full((len(errors), len(classes)), np.nan)
    full[ok] = probs
    best = np.nan_to_num(full, nan=-1.0).argmax(axis=1)
    frame = pd.DataFrame({"class": [classes[b] if good else "" for b, good in zip(best, ok, strict=True)],
                          "error": list(errors)})
    for i, name in enumerate(classes):
        frame[f"p_{name}"] = full[:, i]
    return frame


def predict_files(paths: Sequence[str | Path], model: LoadedModel, batch_size: int = 32) -> pd.DataFrame:
    """One row per file (folders expanded): ``path, class, error, p_<class>``.

    A file that cannot be read gets its error (type and message) and NaN probabilities; the others still run.
    """
    files = expand(paths)
    errors = [""] * len(files)
    probs = []
    for chunk in _chunks(list(enumerate(files)), batch_size):
        arrays = []
        for i, path in chunk:
            try:
                arrays.append(preprocess(path, model))
            except Exception as err:  # noqa: BLE001 - one bad file must not stop the others
                errors[i] = f"{type(err).__name__}: {err}"
        if arrays:
            probs.append(predict_arrays(np.stack(arrays), model, batch_size))
    stacked = np.concatenate(probs) if probs else np.empty((0, len(model.classes)))
    frame = result_frame(stacked, errors, model.classes)
    frame.insert(0, "path", [str(f) for f in files])
    return frame


def _chunks(items: list, n: int) -> Iterator[list]:
    for start in range(0, len(items), n):
        yield items[start:start + n]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def predict_cli(argv: Sequence[str] | None = None) -> int:
    """``python -m kennel predict PATH... [--model REF] [--output CSV] [--batch-size N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m kennel predict", description="Predict the class of image files (folders: every file).")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--model", metavar="REF", help="model file, MLflow run id, models:/<name>@<alias> or "
                        "models:/<name>/<version> (default: models/model.pt)")
    parser.add_argument("--output", metavar="CSV", type=Path, help="write the predictions here instead of a table")
    parser.add_argument("--batch-size", type=_positive, default=32, metavar="N")
    args = parser.parse_args(argv)

    missing = [p for p in args.paths if not Path(p).exists()]
    if len(missing) == len(args.paths):
        _error(f"no such file or folder: {', '.join(missing)}")
        return 2
    from kennel.tracking import project_root

    try:
        model = resolve_model(args.model, project_root())
    except ModelRefError as err:
        _error(f"cannot load model: {err}")
        return 2
    frame = predict_files(args.paths, model, args.batch_size)
    failed = int((frame["error"] != "").sum())
    summary = f"kennel predict: {len(frame)} file(s), {len(frame) - failed} predicted, {failed} failed"
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.output, index=False)
        print(f"{summary}; written to {args.output} (model {model.source})")
    else:
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep=""))
        print(f"{summary} (model {model.source})")
    return 0


def _error(message: str) -> None:
    print(f"kennel predict: error: {message}", file=sys.stderr)
