"""The model file (models/model.pt, the DVC output): weights, classes, input size, resize mode and test-time
augmentation, loadable with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

import torch

from kennel.core.io import atomic_path
from kennel.model.network import Classifier, build_model


def save_model(model: Classifier, path: Path, *, size: int, arch: str, mode: str) -> None:
    """The DVC model output: state dict, class names, input size, resize mode and test-time augmentation (what
    prediction must repeat), loadable with ``weights_only=True``. No defaults: a left-out argument would silently
    describe the wrong preprocessing."""
    payload = {"arch": arch, "classes": model.classes, "size": size, "mode": mode, "tta": model.tta,
               "state_dict": model.state_dict()}
    if len(model.members):  # an ensemble (train.ensemble): its further models' count, for load_model to build
        payload["members"] = len(model.members)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[Classifier, int]:
    """A model written by ``save_model``; returns (model in eval mode, input size)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model, _ = build_model(payload["arch"], payload["classes"], weights="none")
    model.add_members(int(payload.get("members", 0)))  # an ensemble's further models (train.ensemble)
    model.load_state_dict(payload["state_dict"])
    model.tta = payload.get("tta", "none")
    return model.to(device).eval(), int(payload["size"])
