"""``kennel predict``: class probabilities for image files and folders, from a model file or an MLflow model."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.core.errors import ModelRefError
from kennel.core.paths import MODEL
from kennel.core.versioning import RUN_ID
from kennel.train.inference import LoadedModel, load_model_file, predict_arrays, preprocess, result_frame


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
        from kennel.track.refs import load_logged_model, registered_run_id  # mlflow only for MLflow references

        return load_logged_model(registered_run_id(ref, root), root, ref)
    path = Path(ref)
    if path.is_file():
        return _load_file(path, ref)
    if path.exists():
        raise ModelRefError(f"{ref!r}: a folder, not a model file")
    if not RUN_ID.fullmatch(ref):
        raise ModelRefError(f"{ref!r}: no such model file, and not an MLflow run id or models:/ URI")
    from kennel.track.refs import load_logged_model

    return load_logged_model(ref, root, ref)


def _load_file(path: Path, ref: str) -> LoadedModel:
    try:
        return load_model_file(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ModelRefError(f"{ref!r}: not a kennel model file ({type(err).__name__}: {err})") from None


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by every file under them (recursive, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return files


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
    from kennel.serve.cli import command_parser

    parser = command_parser("predict", "Predict the class of image files (folders: every file).")
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
    from kennel.core.paths import project_root

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
    from kennel.serve.cli import fail

    fail("predict", message)
