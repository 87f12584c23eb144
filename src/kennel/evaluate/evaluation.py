"""Score a saved model on the test split: per-image predictions, metrics, curves, and the images it gets most wrong."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kennel.core.device import inference_batch, resolve_amp, resolve_device
from kennel.core.params import Params
from kennel.data.dataset import ImageArrayDataset
from kennel.data.manifest import read_manifest
from kennel.data.shards import read_index
from kennel.evaluate.gradcam import grad_cam
from kennel.evaluate.metrics import Curves, calibration, classification_metrics, curves
from kennel.model.features import backbone_as_loaded, cached_pairs, features_key, logits_from_pairs
from kennel.model.file import load_model
from kennel.model.inference import softmax
from kennel.model.network import Classifier
from kennel.train.batches import make_loader
from kennel.train.loop import predict

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    classes: list[str]
    paths: list[str]  # the manifest path of each test image, in the order of the arrays
    labels: np.ndarray
    probs: np.ndarray
    losses: np.ndarray  # per-image cross-entropy: -log(probability of the true class)
    metrics: dict
    reliability: pd.DataFrame  # calibration table: one row per non-empty confidence bin
    curves: list[Curves]  # binary: the positive class; more classes: one per class, one-vs-rest
    images: np.ndarray = field(repr=False)  # uint8 N x 3 x S x S, what the model saw
    model: Classifier = field(repr=False)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def confusion_rows(self) -> pd.DataFrame:
        """One row per test image (actual, predicted): DVC's confusion template counts them."""
        return pd.DataFrame({
            "actual": [self.classes[i] for i in self.labels],
            "predicted": [self.classes[i] for i in self.predicted],
        })

    def predictions(self) -> pd.DataFrame:
        """One row per test image: path, true and predicted class, a probability per class, loss."""
        frame = pd.DataFrame({
            "path": self.paths,
            "true": [self.classes[i] for i in self.labels],
            "predicted": [self.classes[i] for i in self.predicted],
        })
        for k, name in enumerate(self.classes):
            frame[f"prob_{name}"] = self.probs[:, k]
        frame["loss"] = self.losses
        return frame

    def top_losses(self, k: int) -> np.ndarray:
        """Indices of the ``k`` highest-loss test images, highest first: the most confidently wrong lead."""
        return np.argsort(-self.losses, kind="stable")[:k]

    def captions(self, indices: np.ndarray) -> list[str]:
        """true / predicted (its probability) / loss, and the file name, for each image."""
        return [
            f"{Path(self.paths[i]).name[:28]}\ntrue {self.classes[self.labels[i]]}  loss {self.losses[i]:.2f}\n"
            f"pred {self.classes[self.predicted[i]]} ({self.probs[i, self.predicted[i]]:.2f})"
            for i in indices
        ]

    def cams(self, indices: np.ndarray) -> np.ndarray:
        """Grad-CAM heatmaps of the predicted class for the given test images."""
        images = torch.from_numpy(np.array(self.images[indices]))
        return grad_cam(self.model, images, torch.from_numpy(self.predicted[indices]))


def evaluate_model(
    model_path: Path, data_dir: Path, manifest: Path, split: str = "test", device: str = "auto",
    amp: str = "auto", batch_size: int | None = None, calibration_bins: int = 10, params: Params | None = None,
) -> Evaluation:
    """``params`` (the run's): when the model's backbone is still the pretrained one its ``model.weights`` load
    (a head-only run) and the audit's cache holds the split's features under the run's fingerprint, the head
    scores those instead of a second pass through the backbone: the same logits, bit for bit."""
    dev = resolve_device(device)
    amp_dtype = resolve_amp(amp, dev)
    model, _ = load_model(model_path, dev)
    dataset = ImageArrayDataset(data_dir, split)
    if len(dataset) == 0:
        raise ValueError(f"{data_dir}: the {split} split is empty; raise data.test_fraction")
    outputs = from_the_audits_features(model, params, data_dir, split, dev, amp_dtype) if params is not None else None
    if outputs is None:
        batches = make_loader(dataset, batch_size=batch_size or inference_batch(dev), num_workers=0, device=dev)
        outputs = predict(model, batches, dev, amp_dtype, desc=f"evaluate {split}")
    logits, labels = outputs[0].numpy().astype(np.float64), outputs[1].numpy()
    probs = softmax(logits)
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    return Evaluation(
        classes=model.classes,
        paths=split_paths(manifest, data_dir, split, model.classes, labels),
        labels=labels,
        probs=probs,
        losses=np.maximum(-log_probs[np.arange(len(labels)), labels], 0.0),  # no -0.0
        metrics=classification_metrics(labels, probs, model.classes, calibration_bins),
        reliability=calibration(labels, probs, calibration_bins)[1],
        curves=curves(labels, probs, model.classes),
        images=dataset.images,
        model=model,
    )


def from_the_audits_features(model: Classifier, params: Params, data_dir: Path, split: str, device: torch.device,
                             amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logits, labels) of ``split`` from the audit's cached features, or None when they cannot be the model's."""
    if model.tta == "dihedral":  # the cache holds each image and its mirror, not their turns
        return None
    key = features_key(params, data_dir, amp_dtype)
    pairs = cached_pairs(data_dir, split, key) if key else None
    if pairs is None or not backbone_as_loaded(model, params.model.arch, params.model.weights):
        return None
    log.info("%s split: the head on the audit's features of its %d images (the backbone is %s's, unchanged)",
             split, len(pairs[1]), params.model.weights)
    return logits_from_pairs(model, pairs[0], device, amp_dtype), pairs[1]


def split_paths(manifest: Path, data_dir: Path, split: str, classes: list[str], labels: np.ndarray) -> list[str]:
    """The manifest paths of a split, in the order its arrays are read: the data folder's index rows of that split
    (its split column, which the audit stage may have changed from the manifest's), joined to the manifest by
    sha1."""
    rows = read_manifest(manifest)
    index = read_index(data_dir)
    index = index[index["split"] == split]
    path_of = dict(zip(rows["sha1"], rows["path"], strict=True))
    number = {name: i for i, name in enumerate(classes)}
    if any(s not in path_of for s in index["sha1"]) or [number.get(label, -1) for label in index["label"]] != \
            labels.tolist():
        raise ValueError(f"{manifest}: the {split} rows do not match the {split} split of {data_dir}; "
                         "rerun the pipeline (dvc repro)")
    return [path_of[s] for s in index["sha1"]]


def file_name(label: str) -> str:
    """A class name made safe as a file name (class names come from folder names, but need not be tidy)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "class"
