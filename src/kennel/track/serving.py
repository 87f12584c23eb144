"""An MLflow pyfunc model that classifies images, so ``mlflow models serve`` can answer requests carrying images.

It wraps the kennel model file and does the same preprocessing as ``kennel predict``; logged with
``runtime="onnx"`` it wraps the ONNX file ``kennel export`` wrote and runs it on onnxruntime, as
``kennel predict --runtime onnx`` does. Requests carry either
image files (a ``dataframe_split`` with a column ``image`` of base64-encoded file bytes, any format PIL reads) or
pixels (``inputs``: N x 3 x S x S or N x S x S x 3, values 0..255). Either way the answer has one row per image:
``class``, ``error`` (empty when fine) and ``p_<class>``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from PIL import UnidentifiedImageError

import kennel
from kennel.data.images import load_array
from kennel.model.outputs import result_frame
from kennel.track.models import pinned

if TYPE_CHECKING:
    from kennel.model.inference import LoadedModel
    from kennel.model.onnx_inference import OnnxModel

IMAGE_COLUMN = "image"
RUNTIMES = ("torch", "onnx")
# Shared by the server's request threads: a request's images decode side by side, without a pool per request.
DECODERS = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="kennel-decode")


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The kennel model file in ``artifacts["model"]``; images or pixel arrays in, class probabilities out."""

    # ``model_input`` is untyped on purpose: with a type hint MLflow's server accepts only {"inputs": ...} and
    # refuses the dataframe_split that carries image files. This is MLflow's own switch (its chat models set it)
    # for a predict without hints: no input validation wrapper, and no warning asking for hints.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        path = Path(context.artifacts["model"])
        if path.suffix == ".onnx":  # logged with runtime="onnx"
            from kennel.model.onnx_inference import load_onnx_model, predict_onnx  # onnxruntime only when asked

            self.model: LoadedModel | OnnxModel = load_onnx_model(path)
            self._probabilities = predict_onnx
        else:
            from kennel.model.inference import load_model_file, predict_arrays  # torch: only this runtime needs it

            self.model = load_model_file(path)
            self._probabilities = predict_arrays

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:  # {"inputs": {"image": [...]}}
            model_input = pd.DataFrame({IMAGE_COLUMN: list(np.atleast_1d(model_input[IMAGE_COLUMN]))})
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise MlflowException.invalid_parameter_value(
                    f"expected a column {IMAGE_COLUMN!r} of base64-encoded image files, got columns "
                    f"{list(model_input.columns)}")
            return self._predict_encoded(list(model_input[IMAGE_COLUMN]))
        return self._predict_pixels(np.asarray(model_input))

    def _predict_encoded(self, values: list) -> pd.DataFrame:
        """One row per value; a value that does not decode to an image gets its error, the others still run.
        The values decode in a thread pool: PIL releases the GIL while it decodes and resizes."""
        decoded = list(DECODERS.map(self._decode, values))
        arrays = [a for a, _ in decoded if a is not None]
        errors = [e for _, e in decoded]
        size = self.model.size
        images = np.stack(arrays) if arrays else np.empty((0, 3, size, size), dtype=np.uint8)
        return result_frame(self._probabilities(images, self.model), errors, self.model.classes)

    def _decode(self, value: object) -> tuple[np.ndarray | None, str]:
        try:
            return load_array(io.BytesIO(_image_bytes(value)), self.model.size, mode=self.model.mode), ""
        except UnidentifiedImageError:
            return None, "UnidentifiedImageError: not an image file PIL can read"
        except Exception as err:  # noqa: BLE001 - one bad image must not fail the whole request
            return None, f"{type(err).__name__}: {err}"

    def _predict_pixels(self, x: np.ndarray) -> pd.DataFrame:
        size = self.model.size
        if x.ndim == 3:
            x = x[None]  # a single image
        if x.ndim == 4 and x.shape[1] != 3 and x.shape[3] == 3:
            x = x.transpose(0, 3, 1, 2)  # HWC, as images usually come
        if x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise MlflowException.invalid_parameter_value(
                f"expected pixels N x 3 x {size} x {size} or N x {size} x {size} x 3, got shape {x.shape}")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise MlflowException.invalid_parameter_value(f"expected numbers 0..255, got dtype {x.dtype}")
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 255):
            # casting would wrap 256 to 0 silently
            raise MlflowException.invalid_parameter_value("pixel values must lie in 0..255")
        images = np.rint(x).astype(np.uint8) if np.issubdtype(x.dtype, np.floating) else x.astype(np.uint8)
        probs = self._probabilities(images, self.model)
        return result_frame(probs, [""] * len(images), self.model.classes)


def _image_bytes(value: object) -> bytes:
    """Raw bytes pass through; text is base64 (what JSON can carry)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise ValueError(f"not base64 ({err})") from None


def log_serving_model(model_file: Path, name: str = "classifier", registered_model_name: str | None = None,
                      runtime: str = "torch") -> str:
    """Log ``model_file`` as a servable pyfunc model in the active MLflow run; returns its ``models:/`` URI.

    The kennel package travels with the model (``code_paths``), so serving needs no kennel install; the model
    itself is ``serving_model.py``, run on load, so nothing is pickled. Classes, input size and resize mode go
    into the model's metadata for clients that send pixels. ``runtime="onnx"``: ``model_file`` is an ONNX file
    ``kennel export`` wrote, run on onnxruntime; that model neither imports nor requires torch and torchvision.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime = {runtime!r}: allowed: {', '.join(RUNTIMES)}")
    onnx = runtime == "onnx"
    if onnx:
        from kennel.model.onnx_inference import load_onnx_model

        loaded = load_onnx_model(Path(model_file))
        tta, runtime_packages = loaded.metadata.get("tta", "none"), ["onnxruntime"]
    else:
        from kennel.model.inference import load_model_file

        loaded = load_model_file(Path(model_file))
        tta, runtime_packages = loaded.module.tta, ["torch", "torchvision"]
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("serving_model.py")),
        artifacts={"model": str(model_file)},
        code_paths=[str(Path(kennel.__file__).parent)],
        pip_requirements=pinned(*runtime_packages, "pillow", "numpy", "pandas", "mlflow"),
        registered_model_name=registered_model_name,
        metadata={"kennel.classes": loaded.classes, "kennel.size": loaded.size, "kennel.mode": loaded.mode,
                  "kennel.tta": tta, "kennel.runtime": runtime},
    )
    return info.model_uri
