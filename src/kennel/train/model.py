"""Build a torchvision classifier with a new head, load its weights (offline-aware), freeze it for head training."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from kennel.core.archs import head_path, supported_archs
from kennel.core.errors import WeightsError
from kennel.core.io import atomic_path

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 30
# KENNEL_OFFLINE=1: never try to download weights, use the cache or fail (air-gapped machines, tests).

# Wrappers other tools put around a state dict's keys: DDP, torch.compile, Lightning / SSL code, kennel itself.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.")




class Classifier(nn.Module):
    """uint8 (or 0..255 float) images N x 3 x S x S -> logits; normalisation lives in the model.

    Keeping the ImageNet normalisation inside the module means training, evaluation, ``kennel predict`` and
    the MLflow model all take the same raw pixels, and the division runs on the device. With ``tta = "flip"``
    the eval-mode output is the mean of the logits of each image and its mirror.
    """

    def __init__(self, backbone: nn.Module, classes: Sequence[str], head: str, frozen: bool = False,
                 tta: str = "none"):
        super().__init__()
        self.backbone = backbone
        self.classes = list(classes)
        self.head_name = head
        self.tta = tta
        self.freeze_bn = False  # training keeps the backbone's BatchNorm statistics (set for a run, not saved)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.set_frozen(frozen)

    @property
    def head(self) -> nn.Module:
        return self.backbone.get_submodule(self.head_name)

    def head_parameter_names(self) -> set[str]:
        return {f"backbone.{self.head_name}.{n}" for n, _ in self.head.named_parameters()}

    def set_frozen(self, frozen: bool) -> None:
        """Frozen: only the head learns, and the backbone's BatchNorm statistics stay as they are."""
        self.frozen = frozen
        head = self.head_parameter_names()
        for name, p in self.named_parameters():
            p.requires_grad = not frozen or name in head
        self.train(self.training)

    @contextmanager
    def without_head(self) -> Iterator[Classifier]:
        """The model outputting the head's input (the backbone features), for as long as the block runs."""
        parent_name, _, leaf = self.head_name.rpartition(".")
        parent = self.backbone.get_submodule(parent_name) if parent_name else self.backbone
        head = self.head
        setattr(parent, leaf, nn.Identity())
        try:
            yield self
        finally:
            setattr(parent, leaf, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        if self.tta == "flip" and not self.training:
            # two passes rather than one over a doubled batch: torch.export keeps the batch size dynamic
            return (self.backbone(x) + self.backbone(x.flip(-1))) / 2
        return self.backbone(x)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if getattr(self, "frozen", False):
            self.backbone.eval()
            self.head.train(mode)
        elif mode and getattr(self, "freeze_bn", False):
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()  # normalise with the pretrained statistics; the affine weights still learn
        return self


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # imagenet | none | file:<path> | random-fallback
    warning: str = ""
    loaded: int = 0  # tensors taken from the weights
    at_init: list[str] = field(default_factory=list)  # keys left at their random init (the new head)

    def tags(self) -> dict[str, str]:
        """What the MLflow run records about the weights."""
        tags = {"kennel.weights": self.source, "kennel.weights_loaded": str(self.loaded)}
        if self.at_init:
            tags["kennel.weights_at_init"] = ",".join(self.at_init)
        return tags


def build_model(
    arch: str, classes: Sequence[str], weights: str = "none", finetune: str = "full"
) -> tuple[Classifier, WeightsInfo]:
    """``arch`` with its head replaced by ``Linear(in_features, len(classes))``, weights loaded per ``weights``.

    ``finetune: head`` (and the first phase of ``staged``) starts frozen.
    """
    head = head_path(arch)
    if not head or arch not in list_models(module=torchvision.models):
        raise ValueError(f"model.arch = {arch!r}: allowed: {', '.join(supported_archs())}")
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes, got {list(classes)}")
    backbone = get_model(arch, weights=None, num_classes=len(classes))
    state, info = read_weights(arch, weights, len(classes))
    if state is not None:
        backbone.load_state_dict(state, strict=False)  # read_weights checked that only the head is missing
    return Classifier(backbone, classes, head, frozen=finetune in ("head", "staged")), info


def read_weights(arch: str, weights: str, num_classes: int) -> tuple[dict | None, WeightsInfo]:
    """The state dict ``weights`` names for ``arch``, checked against it key by key (None for random init).

    Raises WeightsError naming the file and the first offending keys; cheap enough to call before any work.
    """
    if weights == "none":
        return None, WeightsInfo("none")
    if weights in ("imagenet", "auto"):
        try:
            state, where = _imagenet_state_dict(arch), imagenet_url(arch)
        except WeightsError as err:
            if weights == "imagenet":
                raise
            warning = f"ImageNet weights unavailable, training from random init: {err}"
            log.warning(warning)
            return None, WeightsInfo("random-fallback", warning)
        source = "imagenet"
    else:
        where = Path(weights)
        state, source = _read_file(where), f"file:{weights}"
    state, at_init = _match(arch, num_classes, state, where)
    info = WeightsInfo(source, loaded=len(state), at_init=at_init)
    log.info("weights %s: %d tensors loaded, left at init: %s", source, info.loaded, ", ".join(at_init) or "none")
    return state, info


def imagenet_url(arch: str) -> str:
    return get_model_weights(arch).DEFAULT.url


def imagenet_cache_path(arch: str = "resnet18") -> Path:
    """Where torchvision looks for (and downloads) an arch's ImageNet weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(imagenet_url(arch)).name


def _imagenet_state_dict(arch: str) -> dict:
    cached, url = imagenet_cache_path(arch), imagenet_url(arch)
    how_to = (
        f"download {url} and put it at {cached} "
        "(set TORCH_HOME to use another cache folder), or set model.weights to none or a file path"
    )
    if os.environ.get("KENNEL_OFFLINE") == "1" and not cached.is_file():
        raise WeightsError(f"KENNEL_OFFLINE=1 and no cached file at {cached}; {how_to}")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # offline machines should fail fast, not hang
    try:
        return get_model_weights(arch).DEFAULT.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a corrupt cache is a RuntimeError
        raise WeightsError(f"{type(err).__name__}: {err}; {how_to}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _read_file(path: Path) -> dict:
    """A plain state dict from ``path`` (or the one inside a kennel model / training checkpoint file)."""
    if not path.is_file():
        raise WeightsError(
            f"model.weights = {str(path)!r}: file not found; allowed: auto, imagenet, none or a state dict file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or unsafe files all get the same clear message
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise WeightsError(f"{path}: not a loadable state dict ({type(err).__name__}: {first_line})") from None
    for key in ("state_dict", "model"):  # kennel's model.pt / Lightning, and kennel's checkpoint.pt
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds a {type(state).__name__} that is not a state dict of tensors")
    return _strip_wrappers(state)


def _strip_wrappers(state: dict) -> dict:
    """Drop a prefix every key shares (``module.``, ``backbone.``, ...), as often as one is there."""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _match(arch: str, num_classes: int, state: dict, where: str | Path) -> tuple[dict, list[str]]:
    """Check ``state`` against ``arch``: the body must match exactly; a head of another shape is dropped.

    Returns (state to load, keys left at init).
    """
    with torch.device("meta"):  # shapes only, no memory and no init time
        expected = {k: v.shape for k, v in get_model(arch, weights=None, num_classes=num_classes).state_dict().items()}
    head = head_path(arch) + "."
    in_head = lambda k: k.startswith(head)  # noqa: E731
    state = {k: v for k, v in state.items() if not (in_head(k) and k in expected and v.shape != expected[k])}
    unexpected = [k for k in state if k not in expected]
    # a counter, not a weight: files written by older tools lack it
    missing = [k for k in expected if k not in state and not in_head(k) and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}"
                  for k in state if k in expected and state[k].shape != expected[k]]
    if missing or unexpected or mismatched:
        problems = [f"{what} {keys[:3]}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
                    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                       ("shape mismatch", mismatched)) if keys]
        raise WeightsError(f"{where}: not a {arch} state dict: {'; '.join(problems)}")
    return state, [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]


def save_model(model: Classifier, path: Path, *, size: int, arch: str, mode: str) -> None:
    """The DVC model output: state dict, class names, input size, resize mode and test-time augmentation (what
    prediction must repeat), loadable with ``weights_only=True``. No defaults: a left-out argument would silently
    describe the wrong preprocessing."""
    payload = {"arch": arch, "classes": model.classes, "size": size, "mode": mode, "tta": model.tta,
               "state_dict": model.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[Classifier, int]:
    """A model written by ``save_model``; returns (model in eval mode, input size)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model, _ = build_model(payload["arch"], payload["classes"], weights="none")
    model.load_state_dict(payload["state_dict"])
    model.tta = payload.get("tta", "none")
    return model.to(device).eval(), int(payload["size"])
