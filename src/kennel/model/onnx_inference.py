"""Inference on a model ``kennel export`` wrote, with onnxruntime: uint8 images in, class probabilities out.

The preprocessing contract (classes, input size, resize mode, ...) travels in the file's metadata, so the .onnx
file alone is enough to predict. This module imports numpy, PIL (through the decoder) and onnxruntime only: a
predict-only environment needs neither torch nor the training stack.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kennel.model.outputs import softmax

PREFIX = "kennel."  # every key kennel writes into the ONNX metadata_props
REQUIRED = ("classes", "size", "mode")  # without these a file cannot be preprocessed as it was trained
INPUT = "images"  # uint8 N x 3 x S x S, RGB, 0..255: normalisation is inside the graph
OUTPUT = "logits"


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX classifier ready for inference: the session, and what it needs to preprocess files."""

    session: ort.InferenceSession
    classes: list[str]
    size: int
    mode: str
    source: str  # where it came from, for messages
    metadata: dict[str, str]  # every kennel.* entry of the file, as written


def read_contract(props: Mapping[str, str], source: str) -> dict[str, str]:
    """The ``kennel.*`` entries of an ONNX file's metadata, prefix dropped; ValueError naming ``source`` when the
    ones preprocessing needs are missing (not a file ``kennel export`` wrote)."""
    contract = {k.removeprefix(PREFIX): v for k, v in props.items() if k.startswith(PREFIX)}
    missing = [PREFIX + k for k in REQUIRED if k not in contract]
    if missing:
        raise ValueError(f"{source}: not a kennel ONNX model (no {', '.join(missing)} in its metadata)")
    return contract


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


def load_onnx_model(path: Path, threads: int | None = None) -> OnnxModel:
    """The model in ``path`` on onnxruntime's CPU provider; ValueError naming the file when it is no kennel ONNX
    model (onnxruntime's own error when it is no ONNX file at all)."""
    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    contract = read_contract(session.get_modelmeta().custom_metadata_map, str(path))
    return OnnxModel(session, list(json.loads(contract["classes"])), int(contract["size"]), contract["mode"],
                     str(path), contract)


def predict_onnx(images: np.ndarray, model: OnnxModel, batch_size: int = 32) -> np.ndarray:
    """uint8 N x 3 x S x S -> class probabilities N x C (float64), as ``kennel.model.inference.predict_arrays``."""
    logits = [model.session.run([OUTPUT], {INPUT: np.ascontiguousarray(images[start:start + batch_size])})[0]
              for start in range(0, len(images), batch_size)]
    if not logits:
        return np.empty((0, len(model.classes)))
    return softmax(np.concatenate(logits).astype(np.float64))
