"""From class scores to the rows users read: softmax and the per-file result frame. numpy and pandas only, so the
ONNX runtime path (``kennel predict --runtime onnx``) shares them without importing torch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


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
