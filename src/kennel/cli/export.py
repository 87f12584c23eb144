"""``kennel export``: a trained model as an ONNX file (fp32, or int8) that runs on onnxruntime without the training
stack, checked against the PyTorch model on the test split (or given images) before it is written."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kennel.cli.command import command_parser, mlflow_names, number, positive_int
from kennel.core.errors import ExportError, ModelRefError
from kennel.core.paths import AUDITED, MODEL, ONNX_MODEL, project_root
from kennel.data.images import load_array
from kennel.export.onnx_export import MAX_DROP, QUANTIZE, TOLERANCE, Images, export_from_splits
from kennel.model.inference import LoadedModel, load_model_file

FORMATS = ("onnx",)


def resolve_model_file(ref: str | None, root: Path, scratch: Path) -> Path:
    """``ref``: None (``models/model.pt``), a model file, or a train run: its id, ``champion``, ``models:/...``, a DVC
    experiment name or a commit (its model file is downloaded into ``scratch``)."""
    if ref is None or Path(ref).is_file():
        path = root / MODEL if ref is None else Path(ref)
        if not path.is_file():
            raise ModelRefError(f"{path}: no model file; run `dvc repro train` first, or pass --model")
        return path
    if Path(ref).exists():
        raise ModelRefError(f"{ref!r}: a folder, not a model file")
    # mlflow only for an MLflow reference: exporting a model file never imports it
    from kennel.track.refs import download_model_file, registered_run_id
    from kennel.track.runs import find_train_run

    names = mlflow_names(root)
    run_id = registered_run_id(ref, root) if ref.startswith("models:/") else \
        find_train_run(ref, root, names.experiment, names.registered_model)
    return download_model_file(run_id, root, ref, scratch)


def load_checked(path: Path, ref: str) -> LoadedModel:
    try:
        return load_model_file(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ModelRefError(f"{ref!r}: not a kennel model file ({type(err).__name__}: {err})") from None


def given_images(paths: Sequence[str], model: LoadedModel) -> Images:
    """Image files (folders: every file under them) decoded with the model's own size and resize mode."""
    files = [f for p in map(Path, paths) for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir()
                                                   else [p])]
    arrays, names = [], []
    for f in files:
        try:
            arrays.append(load_array(f, model.size, mode=model.mode))
            names.append(str(f))
        except Exception as err:  # noqa: BLE001 - a check image that does not decode is the user's to fix
            raise ExportError(f"{f}: cannot be read as an image to check the export on ({type(err).__name__})") \
                from None
    if not arrays:
        raise ExportError(f"no image files in {', '.join(paths)} to check the export on")
    return Images(np.stack(arrays), names)


def _parser() -> argparse.ArgumentParser:
    parser = command_parser("export", __doc__.split("\n\n")[0].replace("``", "`"))
    parser.add_argument("--model", metavar="REF", help="model file, MLflow run id, champion, models:/<name>@<alias>, "
                        "a DVC experiment name or a commit (default: models/model.pt)")
    parser.add_argument("--format", default="onnx", choices=FORMATS)
    parser.add_argument("--output", type=Path, metavar="FILE",
                        help=f"where the ONNX file goes (default: {ONNX_MODEL})")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE,
                        help="int8: static quantization calibrated on the train split, kept only when its test "
                             "accuracy drops by at most --max-drop")
    parser.add_argument("--images", nargs="+", metavar="PATH",
                        help="check on these image files or folders (default: the test split of data/audited)")
    parser.add_argument("--sample", type=positive_int, default=256, metavar="N",
                        help="test images the PyTorch and ONNX models are compared on (evenly spaced)")
    parser.add_argument("--tolerance", type=number(float, 0.0), default=TOLERANCE, metavar="P",
                        help="largest difference in a class probability between PyTorch and ONNX fp32 "
                             f"(default {TOLERANCE:g}); any differing top-1 refuses too")
    parser.add_argument("--max-drop", type=number(float, 0.0), default=MAX_DROP, metavar="D",
                        help=f"int8: largest loss of test accuracy, as a fraction (default {MAX_DROP:g})")
    return parser


def run(argv: Sequence[str]) -> int:
    """``python -m kennel export [--model REF] [--output FILE] [--quantize int8] [--images PATH...] ...``."""
    args = _parser().parse_args(argv)
    root = project_root()
    output = args.output or root / ONNX_MODEL
    with tempfile.TemporaryDirectory(prefix="kennel-export-") as scratch:
        path = resolve_model_file(args.model, root, Path(scratch))
        model = load_checked(path, args.model or str(path))
        report = export_from_splits(model, output, root / AUDITED, quantize=args.quantize, sample=args.sample,
                                    check=given_images(args.images, model) if args.images else None,
                                    tolerance=args.tolerance, max_drop=args.max_drop)
    int8 = args.quantize == "int8"
    print(json.dumps(report, indent=1))
    print(f"kennel export: {output} ({report['bytes'] / 2**20:.1f} MiB, {args.quantize}); matches the PyTorch model "
          f"on {report['images']} image(s), max probability difference {report['max_prob_diff']:.2g}"
          + (f"; int8 test accuracy {report['accuracy_int8']:.4f} (drop {report['int8_drop']:.4f})" if int8 else ""))
    return 0
