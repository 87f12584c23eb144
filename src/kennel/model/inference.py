"""A trained model ready for inference, and the one path from a file to class probabilities.

Every file goes through ``kennel.data.images.load_array`` with the model's own size and resize mode, the same call
the resize stage makes, so a file gives the model exactly the tensor it would have had at train time."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from kennel.core.device import to_device
from kennel.data.images import load_array
from kennel.model.file import load_model
from kennel.model.network import Classifier

CPU = torch.device("cpu")
DEFAULT_MODE = "center_crop"  # model files written before the mode was stored were made with the default


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


def preprocess(path: str | Path, model: LoadedModel) -> np.ndarray:
    """``path`` -> uint8 (3, S, S): the resize stage's preprocessing with the model's size and mode."""
    return load_array(path, model.size, mode=model.mode)


def predict_arrays(images: np.ndarray, model: LoadedModel, batch_size: int = 32, *,
                   device: torch.device = CPU, amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """uint8 N x 3 x S x S -> class probabilities N x C (float64), computed on ``device`` (where the model is:
    see :func:`place`) in ``amp_dtype`` autocast when given."""
    logits = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = to_device(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])), device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits.append(model.module(batch).float().cpu().numpy())
    if not logits:
        return np.empty((0, len(model.classes)))
    return softmax(np.concatenate(logits).astype(np.float64))


def place(model: LoadedModel, device: torch.device) -> LoadedModel:
    """``model`` on ``device`` in channels_last. An exported program (a model from MLflow) stays on the CPU it was
    exported for."""
    if device.type == "cpu" or not isinstance(model.module, Classifier):
        return model
    return dataclasses.replace(model, module=model.module.to(device, memory_format=torch.channels_last))


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


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
