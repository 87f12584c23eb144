"""A trained model ready for inference, and the one path from a file to class probabilities.

Every file goes through ``kennel.data.images.load_array`` with the model's own size and resize mode, the same call
the resize stage makes, so a file gives the model exactly the tensor it would have had at train time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kennel.core.device import inference_batch, to_device
from kennel.data.images import load_array
from kennel.model.file import load_model
from kennel.model.network import Classifier
from kennel.model.outputs import result_frame, softmax

__all__ = ["CPU", "DEFAULT_MODE", "LoadedModel", "load_model_file", "place", "predict_arrays", "preprocess",
           "result_frame", "softmax"]

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
    arch: str = ""  # the torchvision arch of a model file ("" for a program loaded from MLflow)


def load_model_file(path: Path) -> LoadedModel:
    """A kennel model file (``models/model.pt``): weights, classes, input size and resize mode."""
    model, size = load_model(path)
    # mmap: only the small entries are read, not the weights a second time
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return LoadedModel(model, list(model.classes), size, str(payload.get("mode", DEFAULT_MODE)), str(path),
                       str(payload["arch"]))


def preprocess(path: str | Path, model: LoadedModel) -> np.ndarray:
    """``path`` -> uint8 (3, S, S): the resize stage's preprocessing with the model's size and mode."""
    return load_array(path, model.size, mode=model.mode)


def predict_arrays(images: np.ndarray, model: LoadedModel, batch_size: int | None = None, *,
                   device: torch.device = CPU, amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """uint8 N x 3 x S x S -> class probabilities N x C (float64), computed on ``device`` (where the model is:
    see :func:`place`) in ``amp_dtype`` autocast when given, ``batch_size`` images a pass (default: the device's
    inference batch)."""
    logits, batch_size = [], batch_size or inference_batch(device)
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
