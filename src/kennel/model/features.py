"""The pretrained backbone's pooled features of an image and of its mirror, computed once per image.

The audit computes them for every image (near-copies, label and outlier checks compare the L2-normalised mean of
the two, so a mirrored copy gets the same vector) and keeps them by image sha1 (``kennel.data.vectors``); a frozen
phase of training (head only, the linear probe, the first phase of staged) trains on the same backbone's features
of the same pixels, so it reads the image's half of the pair instead of a second pass through the backbone. The
fingerprint names everything the values depend on: another arch, weights file, size, resize recipe or precision
is another cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kennel.core.device import amp_name, to_device
from kennel.core.errors import WeightsError
from kennel.core.params import Params
from kennel.data.shards import read_index, read_meta, split_labels, split_rows
from kennel.data.vectors import open_cache
from kennel.model.weights import imagenet_url, read_weights

if TYPE_CHECKING:  # torchvision, which the network imports, is not needed for the perceptual hash's audit
    from kennel.model.network import Classifier

FEATURES_VERSION = "pooled-and-mirror/2"  # bump when the way features are computed changes


def weights_identity(weights: str, arch: str) -> str:
    """What the weights are, for the fingerprint: a file's content hash, or the ImageNet file's name."""
    if weights in ("auto", "imagenet"):
        return imagenet_url(arch).rsplit("/", 1)[-1]  # torchvision's file names carry their hash
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def fingerprint(arch: str, weights: str, size: int, recipe: str, amp_dtype: torch.dtype | None) -> str:
    return "|".join([FEATURES_VERSION, arch, weights_identity(weights, arch), str(size), recipe, amp_name(amp_dtype)])


def features_key(params: Params, data_dir: Path, amp_dtype: torch.dtype | None) -> str | None:
    """The fingerprint under which the audit's cache holds this run's pretrained features; None when the data
    names no cache (the audit found no pretrained weights, or the data was not audited)."""
    meta = read_meta(data_dir)
    if "features" not in meta or params.model.weights == "none":
        return None
    return fingerprint(params.model.arch, params.model.weights, meta["size"], meta.get("recipe", ""), amp_dtype)


def storage_dtype(computed: torch.dtype) -> str:
    """float16 holds bf16 and fp16 values as computed (pooled features sit far inside its range); float32 else."""
    return "float16" if computed in (torch.bfloat16, torch.float16) else "float32"


def pooled_pair(model, images: np.ndarray, device: torch.device, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """N x 2·dim: the backbone's features (the head's input) of each uint8 image, then of its mirror, as computed
    (under ``amp_dtype``'s autocast, as training's forward passes)."""
    return _pooled(model, images, device, amp_dtype, mirror_too=True)


def pooled(model, images: np.ndarray, device: torch.device, amp_dtype: torch.dtype | None) -> np.ndarray:
    """N x dim float32 on the CPU: the backbone's features of each uint8 image, as ``pooled_pair`` computes them."""
    return _pooled(model, images, device, amp_dtype, mirror_too=False).float().cpu().numpy()


def _pooled(model, images: np.ndarray, device: torch.device, amp_dtype: torch.dtype | None,
            mirror_too: bool) -> torch.Tensor:
    x = to_device(torch.from_numpy(np.ascontiguousarray(images)), device)
    with torch.inference_mode(), model.without_head() as body, \
            torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return torch.cat([body(x), body(x.flip(-1))], dim=1) if mirror_too else body(x)


def mean_of_pair(stored: np.ndarray) -> np.ndarray:
    """Stored pairs -> the L2-normalised mean of each image's and its mirror's features (float16): what the audit
    compares, their dot product the cosine similarity."""
    half = stored.shape[1] // 2
    both = stored[:, :half].astype(np.float32) + stored[:, half:].astype(np.float32)
    norms = np.maximum(np.linalg.norm(both, axis=1, keepdims=True), 1e-12)
    return (both / norms).astype(np.float16)


def cached_pairs(data_dir: Path, split: str, key: str) -> tuple[np.ndarray, torch.Tensor] | None:
    """``split``'s stored pairs (N x 2·dim: each image's features, then its mirror's) and labels from the cache
    the audit left for ``data_dir`` (its ``classes.json`` names it), when it holds every image under ``key`` (a
    ``fingerprint``); None when not."""
    meta = read_meta(data_dir)
    if "features" not in meta:
        return None
    rows = split_rows(read_index(data_dir), split)
    cache = open_cache(Path(data_dir) / meta["features"], key, rows["sha1"].tolist())
    if cache is None:
        return None
    return cache.raw(np.arange(len(cache))), torch.from_numpy(split_labels(meta, rows))


def cached_features(data_dir: Path, split: str, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``split``'s features (N x dim, float32: the image's half of each pair) and labels, as ``cached_pairs``."""
    cached = cached_pairs(data_dir, split, key)
    if cached is None:
        return None
    stored, labels = cached
    return torch.from_numpy(stored[:, :stored.shape[1] // 2].astype(np.float32)), labels


def backbone_as_loaded(model: Classifier, arch: str, weights: str) -> bool:
    """Whether every weight and statistic of ``model`` but its head is bit for bit what ``weights`` loads for
    ``arch``: a head-only model, whose backbone never moved, computes the pretrained features the cache holds."""
    if len(model.members):  # an ensemble's members trained all layers
        return False
    try:
        state, _ = read_weights(arch, weights, len(model.classes))
    except WeightsError:  # gone since training (a moved file, an emptied cache): compute instead
        return False
    if state is None:
        return False
    head = model.head_parameter_names()
    body = {k: v for k, v in model.backbone.state_dict().items() if f"backbone.{k}" not in head}
    return body.keys() <= state.keys() and all(torch.equal(v, state[k].to(v.dtype)) for k, v in body.items())


def logits_from_pairs(model: Classifier, stored: np.ndarray, device: torch.device, amp_dtype: torch.dtype | None,
                      batch_size: int = 4096) -> torch.Tensor:
    """What ``model`` outputs (float32, on the CPU) for images whose stored pairs these are, when its backbone is
    the one that computed them: the head on the image's features, or with ``tta`` flip the mean over the image's
    and its mirror's (as ``Classifier.forward``, in the same precision)."""
    half, out = stored.shape[1] // 2, []
    compute = amp_dtype or torch.float32
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=compute, enabled=amp_dtype is not None):
        for start in range(0, len(stored), batch_size):
            pair = to_device(torch.from_numpy(stored[start:start + batch_size]), device).to(compute)
            out.append(model.from_features(pair[:, :half], pair[:, half:]).float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(model.classes))
