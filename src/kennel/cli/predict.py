"""``kennel predict``: class probabilities for image files and folders, from a model file or an MLflow model, on
PyTorch or (``--runtime onnx``: a file ``kennel export`` wrote, or the ONNX model a run logged) on onnxruntime.

torch is imported only on the PyTorch path: predicting from an .onnx file needs numpy, PIL, pandas and onnxruntime
(and mlflow for an ONNX model named by its run).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm import tqdm

from kennel.cli.command import command_parser, number, positive_int
from kennel.core.errors import ModelRefError
from kennel.core.paths import MODEL, ONNX_MODEL, project_root
from kennel.core.versioning import RUN_ID
from kennel.data.images import load_array
from kennel.data.parallel import resolve_workers
from kennel.model.outputs import result_frame

if TYPE_CHECKING:
    import torch

    from kennel.model.inference import LoadedModel
    from kennel.model.onnx_inference import OnnxModel

DEVICES = ("auto", "cpu", "cuda", "mps")
RUNTIMES = ("torch", "onnx")


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
        # mlflow (5 s to import) only for MLflow references: predicting from a model file never imports it
        from kennel.track.refs import load_logged_model, registered_run_id

        return load_logged_model(registered_run_id(ref, root), root, ref)
    path = Path(ref)
    if path.is_file():
        return _load_file(path, ref)
    if path.exists():
        raise ModelRefError(f"{ref!r}: a folder, not a model file")
    if not RUN_ID.fullmatch(ref):
        raise ModelRefError(f"{ref!r}: no such model file, and not an MLflow run id or models:/ URI")
    from kennel.track.refs import load_logged_model  # as above: mlflow only for an MLflow reference

    return load_logged_model(ref, root, ref)


def _load_file(path: Path, ref: str) -> LoadedModel:
    from kennel.model.inference import load_model_file

    try:
        return load_model_file(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ModelRefError(f"{ref!r}: not a kennel model file ({type(err).__name__}: {err})") from None


def resolve_onnx_model(ref: str | None, root: Path) -> OnnxModel:
    """``ref``: None (``models/model.onnx`` under ``root``), an ONNX file ``kennel export`` wrote, or the ONNX model
    the export stage logged to a run: its run id, or a registered model ``models:/name@alias`` / ``.../<version>``."""
    path = root / ONNX_MODEL if ref is None else Path(ref)
    if ref is not None and not path.exists() and (ref.startswith("models:/") or RUN_ID.fullmatch(ref)):
        from kennel.track.refs import download_onnx_file, registered_run_id  # mlflow, never torch

        run_id = registered_run_id(ref, root) if ref.startswith("models:/") else ref
        with tempfile.TemporaryDirectory(prefix="kennel-onnx-") as tmp:  # onnxruntime reads it whole on load
            return _load_onnx(download_onnx_file(run_id, root, ref, Path(tmp)), ref, source=f"{ref} (run {run_id})")
    if not path.is_file():
        raise ModelRefError(f"{ref or path}: no ONNX model file (--runtime onnx takes a file `kennel export` "
                            "writes, a run id or a models:/ URI; `dvc repro export` writes models/model.onnx)")
    return _load_onnx(path, ref or str(path))


def _load_onnx(path: Path, ref: str, source: str | None = None) -> OnnxModel:
    from kennel.model.onnx_inference import load_onnx_model

    try:
        model = load_onnx_model(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ModelRefError(f"{ref}: not a kennel ONNX model ({type(err).__name__}: {err})") from None
    return dataclasses.replace(model, source=source) if source else model


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by every file under them (recursive, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return files


class FileImages:
    """Files decoded as the resize stage decodes them (the model's size and resize mode), one per item, in the
    DataLoader's worker processes. A file that fails gives its error instead of pixels: it never stops the rest."""

    def __init__(self, paths: Sequence[Path], size: int, mode: str):
        self.paths, self.size, self.mode = list(paths), size, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, load_array(self.paths[i], self.size, mode=self.mode), ""
        except Exception as err:  # noqa: BLE001 - one bad file must not stop the others
            return i, None, f"{type(err).__name__}: {err}"


def _collate(items: list) -> tuple[list[int], np.ndarray, list[str]]:
    arrays = [a for _, a, _ in items if a is not None]
    return [i for i, _, _ in items], np.stack(arrays) if arrays else np.empty((0, 0)), [e for _, _, e in items]


def predict_batches(files: Sequence[Path], model: LoadedModel | OnnxModel, *, batch_size: int = 32,
                    workers: int | str = "auto", device: torch.device | None = None,
                    amp_dtype: torch.dtype | None = None) -> Iterator[pd.DataFrame]:
    """``path, class, error, p_<class>`` for ``files``, a frame per batch, in order.

    Worker processes decode the next batches while the model runs this one (``workers`` = 0: decode here); the
    model runs on ``device`` in ``amp_dtype``. An ONNX model (``kennel.model.onnx_inference``) runs on
    onnxruntime's CPU threads and its files decode here, without torch. A progress bar counts files when stderr is
    a terminal.
    """
    onnx = hasattr(model, "session")
    n_workers = 0 if onnx else decode_workers(workers, device, len(files) // batch_size)
    with tqdm(total=len(files), desc="predict", unit="img", disable=None, leave=False) as bar:
        for indices, arrays, errors in _decoded(files, model, batch_size, n_workers, device):
            probs = _probabilities(arrays, model, batch_size, device, amp_dtype) if len(arrays) \
                else np.empty((0, len(model.classes)))
            frame = result_frame(probs, errors, model.classes)
            frame.insert(0, "path", [str(files[i]) for i in indices])
            bar.update(len(indices))
            yield frame


def _decoded(files: Sequence[Path], model: LoadedModel | OnnxModel, batch_size: int, n_workers: int,
             device: torch.device | None) -> Iterator[tuple[list[int], np.ndarray, list[str]]]:
    """(indices, uint8 arrays of the files that decoded, an error per file) per batch."""
    dataset = FileImages(files, model.size, model.mode)
    pin = device is not None and device.type == "cuda"
    if not n_workers and not pin:  # decoded here, in order: no DataLoader, so no torch import
        for start in range(0, len(files), batch_size):
            yield _collate([dataset[i] for i in range(start, min(start + batch_size, len(files)))])
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(dataset, batch_size=batch_size, num_workers=n_workers, collate_fn=_collate,
                          pin_memory=pin, prefetch_factor=4 if n_workers else None)


def _probabilities(arrays: np.ndarray, model: LoadedModel | OnnxModel, batch_size: int,
                   device: torch.device | None, amp_dtype: torch.dtype | None) -> np.ndarray:
    if hasattr(model, "session"):
        from kennel.model.onnx_inference import predict_onnx

        return predict_onnx(arrays, model, batch_size)
    from kennel.core.device import inference_batch
    from kennel.model.inference import CPU, predict_arrays

    device = device or CPU  # on a CPU, the batch's files run a few at a time: faster, the same numbers
    return predict_arrays(arrays, model, inference_batch(device, batch_size), device=device, amp_dtype=amp_dtype)


def decode_workers(workers: int | str, device: torch.device | None, batches: int) -> int:
    """Processes decoding while the model runs. ``auto``: every CPU when the model runs on an accelerator; on the
    CPU, where the model needs the cores itself, one per four (none below four cores). Measured on 2 cores
    (benchmarks/predict.py): decode workers took the model's cores and predict fell to 0.91x a serial decode."""
    if workers == "auto":
        cores = resolve_workers("auto")
        workers = cores if device is not None and device.type != "cpu" else cores // 4
    return max(0, min(int(workers), batches))


def predict_files(paths: Sequence[str | Path], model: LoadedModel | OnnxModel, batch_size: int = 32, *,
                  workers: int | str = 0, device: torch.device | None = None,
                  amp_dtype: torch.dtype | None = None) -> pd.DataFrame:
    """One row per file (folders expanded): ``path, class, error, p_<class>``.

    A file that cannot be read gets its error (type and message) and NaN probabilities; the others still run.
    """
    files = expand(paths)
    frames = list(predict_batches(files, model, batch_size=batch_size, workers=workers, device=device,
                                  amp_dtype=amp_dtype))
    if not frames:
        frame = result_frame(np.empty((0, len(model.classes))), [], model.classes)
        frame.insert(0, "path", [])
        return frame
    return pd.concat(frames, ignore_index=True)


def done_paths(output: Path) -> set[str]:
    """The paths an earlier, interrupted ``--output`` run already wrote (a torn last line is dropped)."""
    if not output.is_file() or output.stat().st_size == 0:
        return set()
    lines = output.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        output.write_text("".join(lines[:-1]))  # the row a kill cut short is predicted again
    try:
        return set(pd.read_csv(output, usecols=["path"], dtype=str, keep_default_na=False)["path"])
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return set()


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return number(int, 0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number >= 0, got {text!r}") from None


def _device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    from kennel.core.device import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError:
        parser.error(f"argument --device: no {name} device is available here: use auto or cpu")


def _parser() -> argparse.ArgumentParser:
    parser = command_parser("predict", "Predict the class of image files (folders: every file).")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--model", metavar="REF", help="model file, MLflow run id, models:/<name>@<alias> or "
                        "models:/<name>/<version> (default: models/model.pt); with --runtime onnx an .onnx file or the "
                        "ONNX model the export stage logged to that run (default: models/model.onnx)")
    parser.add_argument("--output", metavar="CSV", type=Path,
                        help="write the predictions here, batch by batch, instead of a table at the end")
    parser.add_argument("--resume", action="store_true",
                        help="with --output: keep the rows it already has and predict only the other files")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                        help="files decoded and predicted per step, written together with --output (the torch "
                             "runtime on a CPU runs them 8 at a time, where small batches run fastest)")
    parser.add_argument("--workers", type=_workers, default="auto", metavar="N",
                        help="processes that decode files while the model runs (auto: all CPUs with a GPU, one "
                             "per four on a CPU; 0: none)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="torch runtime only")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                        help="mixed precision (auto: bf16 where the hardware runs it natively); torch runtime only")
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES,
                        help="torch (the model file or an MLflow model) or onnx (an .onnx file `kennel export` "
                             "wrote or a run's logged one, default models/model.onnx; runs on onnxruntime without "
                             "importing torch)")
    return parser


def run(argv: Sequence[str]) -> int:
    """``python -m kennel predict PATH... [--model REF] [--output CSV [--resume]] [--device D] [--amp A] ...``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.resume and not args.output:
        parser.error("--resume needs --output (the file whose rows are kept)")
    missing = [p for p in args.paths if not Path(p).exists()]
    if len(missing) == len(args.paths):
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    try:
        if args.runtime == "onnx":
            model, device, amp_dtype = resolve_onnx_model(args.model, project_root()), None, None
        else:
            from kennel.core.device import resolve_amp
            from kennel.model.inference import place

            device = _device(args.device, parser)
            model, amp_dtype = place(resolve_model(args.model, project_root()), device), resolve_amp(args.amp, device)
    except ModelRefError as err:
        raise ModelRefError(f"cannot load model: {err}") from None
    files = expand(args.paths)
    done = done_paths(args.output) if args.resume else set()
    todo = [f for f in files if str(f) not in done]
    batches = predict_batches(todo, model, batch_size=args.batch_size, workers=args.workers, device=device,
                              amp_dtype=amp_dtype)
    if args.output:
        _write(batches, args.output, done, model.source)
    else:
        _print(batches, model.source)
    return 0


def _write(batches: Iterator[pd.DataFrame], output: Path, done: set[str], source: str) -> None:
    """Each batch reaches the disk as it is done: a crash keeps what was predicted."""
    output.parent.mkdir(parents=True, exist_ok=True)
    header, total, failed = not done, 0, 0
    with open(output, "a" if done else "w", newline="") as out:
        for frame in batches:
            frame.to_csv(out, index=False, header=header)
            out.flush()
            header, total, failed = False, total + len(frame), failed + int((frame["error"] != "").sum())
    kept = f", {len(done)} kept from the earlier run" if done else ""
    print(f"kennel predict: {total} file(s), {total - failed} predicted, {failed} failed{kept}; written to "
          f"{output} (model {source})")


def _print(batches: Iterator[pd.DataFrame], source: str) -> None:
    frames = list(batches)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["path", "class", "error"])
    failed = int((frame["error"] != "").sum())
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep=""))
    print(f"kennel predict: {len(frame)} file(s), {len(frame) - failed} predicted, {failed} failed "
          f"(model {source})")
