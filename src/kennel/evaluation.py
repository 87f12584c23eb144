"""Score a saved model on the test split: probabilities, metrics and the curves for plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.data.dataset import ImageArrayDataset
from kennel.engine import predict, resolve_amp, resolve_device
from kennel.metrics import classification_metrics, roc_curve, softmax
from kennel.model import load_model
from kennel.training import make_loader


@dataclass
class Evaluation:
    classes: list[str]
    labels: np.ndarray
    probs: np.ndarray
    metrics: dict

    def confusion_rows(self) -> pd.DataFrame:
        """One row per test image (actual, predicted): DVC's confusion template counts them."""
        return pd.DataFrame({
            "actual": [self.classes[i] for i in self.labels],
            "predicted": [self.classes[i] for i in self.probs.argmax(axis=1)],
        })

    def roc(self) -> pd.DataFrame | None:
        if "roc_auc" not in self.metrics:
            return None
        fpr, tpr, thresholds = roc_curve(self.labels == 1, self.probs[:, 1])
        return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})


def evaluate_model(
    model_path: Path, data_dir: Path, split: str = "test", device: str = "auto", amp: str = "auto",
    batch_size: int = 64,
) -> Evaluation:
    dev = resolve_device(device)
    model, _ = load_model(model_path, dev)
    dataset = ImageArrayDataset(data_dir, split)
    if len(dataset) == 0:
        raise ValueError(f"{data_dir}: the {split} split is empty; raise data.test_fraction")
    logits, labels = predict(model, make_loader(dataset, batch_size, 0, dev), dev, resolve_amp(amp, dev))
    probs = softmax(logits.numpy().astype(np.float64))
    labels = labels.numpy()
    return Evaluation(model.classes, labels, probs, classification_metrics(labels, probs, model.classes))
