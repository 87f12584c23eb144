"""Build resnet18 with a new head, load its weights (offline-aware), freeze the backbone for head fine-tuning."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_WEIGHTS = ResNet18_Weights.IMAGENET1K_V1
DOWNLOAD_TIMEOUT_S = 30
# KENNEL_OFFLINE=1: never try to download weights, use the cache or fail (air-gapped machines, tests).


class WeightsError(RuntimeError):
    """The requested weights cannot be had; the message says where to put the file."""


class Classifier(nn.Module):
    """uint8 (or 0..255 float) images N x 3 x S x S -> logits; normalisation lives in the model.

    Keeping the ImageNet normalisation inside the module means training, evaluation, ``kennel predict`` and
    the MLflow model all take the same raw pixels, and the division runs on the device.
    """

    def __init__(self, backbone: nn.Module, classes: Sequence[str], head_only: bool = False):
        super().__init__()
        self.backbone = backbone
        self.classes = list(classes)
        self.head_only = head_only
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        if head_only:
            for name, p in backbone.named_parameters():
                p.requires_grad = name.startswith("fc.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return self.backbone(x)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.head_only:
            # A frozen backbone keeps its BatchNorm statistics too; only the head learns.
            self.backbone.eval()
            self.backbone.fc.train(mode)
        return self


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # imagenet | none | file:<path> | random-fallback
    warning: str = ""


def build_model(
    arch: str, classes: Sequence[str], weights: str = "none", finetune: str = "full"
) -> tuple[Classifier, WeightsInfo]:
    """resnet18 with ``fc`` replaced by ``Linear(num_ftrs, len(classes))``, weights loaded per ``weights``."""
    if arch != "resnet18":
        raise ValueError(f"model.arch = {arch!r}: allowed: resnet18")
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes, got {list(classes)}")
    backbone = resnet18()
    backbone.fc = nn.Linear(backbone.fc.in_features, len(classes))
    info = _load_backbone_weights(backbone, weights)
    return Classifier(backbone, classes, head_only=finetune == "head"), info


def imagenet_cache_path() -> Path:
    """Where torchvision looks for (and downloads) the ImageNet weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name


def _load_backbone_weights(backbone: nn.Module, weights: str) -> WeightsInfo:
    if weights == "none":
        return WeightsInfo("none")
    if weights in ("imagenet", "auto"):
        try:
            state = _imagenet_state_dict()
        except WeightsError as err:
            if weights == "imagenet":
                raise
            warning = f"ImageNet weights unavailable, training from random init: {err}"
            log.warning(warning)
            return WeightsInfo("random-fallback", warning)
        _load_state(backbone, state, IMAGENET_WEIGHTS.url)
        return WeightsInfo("imagenet")
    return WeightsInfo(f"file:{weights}", _load_file(backbone, Path(weights)))


def _imagenet_state_dict() -> dict:
    cached = imagenet_cache_path()
    how_to = (
        f"download {IMAGENET_WEIGHTS.url} and put it at {cached} "
        "(set TORCH_HOME to use another cache folder), or set model.weights to none or a file path"
    )
    if os.environ.get("KENNEL_OFFLINE") == "1" and not cached.is_file():
        raise WeightsError(f"KENNEL_OFFLINE=1 and no cached file at {cached}; {how_to}")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # offline machines should fail fast, not hang
    try:
        return IMAGENET_WEIGHTS.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a corrupt cache is a RuntimeError
        raise WeightsError(f"{type(err).__name__}: {err}; {how_to}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _load_file(backbone: nn.Module, path: Path) -> str:
    """Load a resnet18 state dict, or a kennel model file (warm start, head kept when the classes match)."""
    if not path.is_file():
        raise WeightsError(
            f"model.weights = {str(path)!r}: file not found; allowed: auto, imagenet, none or a state dict file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise WeightsError(f"{path}: not a loadable state dict ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a resnet18 state dict")
    _load_state(backbone, {k.removeprefix("backbone."): v for k, v in state.items()}, path)
    return ""


def _load_state(backbone: nn.Module, state: dict, path: str | Path) -> None:
    """Load everything but a head of another shape (ImageNet's 1000 classes), which stays freshly initialised."""
    fc_shapes = {k: v.shape for k, v in backbone.state_dict().items() if k.startswith("fc.")}
    state = {k: v for k, v in state.items() if not (k in fc_shapes and v.shape != fc_shapes[k])}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise WeightsError(f"{path}: not a resnet18 state dict ({str(err).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: not a resnet18 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def save_model(model: Classifier, path: Path, size: int, arch: str = "resnet18", mode: str = "center_crop") -> None:
    """The DVC model output: state dict, class names, input size and resize mode (what prediction must repeat),
    loadable with ``weights_only=True``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"arch": arch, "classes": model.classes, "size": size, "mode": mode, "state_dict": model.state_dict()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[Classifier, int]:
    """A model written by ``save_model``; returns (model in eval mode, input size)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model, _ = build_model(payload["arch"], payload["classes"], weights="none")
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), int(payload["size"])
