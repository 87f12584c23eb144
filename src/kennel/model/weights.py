"""Pretrained weights for a backbone: ImageNet's (cached by torchvision, offline-aware) or a file, checked key by
key against the architecture before any work."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kennel.core.archs import head_path
from kennel.core.errors import WeightsError

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 30
# KENNEL_OFFLINE=1: never try to download weights, use the cache or fail (air-gapped machines, tests).

# Wrappers other tools put around a state dict's keys: DDP, torch.compile, Lightning / SSL code, kennel itself.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.")


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
    from torchvision.models import get_model_weights  # torchvision (1.5 s) only where weights are looked up

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
        from torchvision.models import get_model_weights

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
    # a kennel ensemble (train.ensemble): its first model is the one a run starts from
    return _strip_wrappers({k: v for k, v in state.items() if not k.startswith("members.")})


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
    from torchvision.models import get_model

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
