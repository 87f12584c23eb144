"""What an image is compared by: the pretrained backbone's pooled features, or a perceptual hash without them.

The features are those of ``model.arch`` with ``model.weights``, head removed, averaged over each image and its
mirror (so a mirrored copy gets the same vector up to resampling), L2-normalised: their dot product is the cosine
similarity. Random-init features say nothing about content, so without pretrained weights near-copies are found by
a mirror-aware perceptual hash instead, and label checks are skipped.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from kennel.audit.cache import Featurizer
from kennel.audit.phash import phash_featurizer
from kennel.core.device import amp_name, resolve_amp, resolve_device, to_device
from kennel.model.weights import WeightsInfo, imagenet_url

log = logging.getLogger(__name__)

EMBEDDING_VERSION = "pooled-flip-mean-l2/1"  # bump when the way features are computed changes


def pretrained(info: WeightsInfo) -> bool:
    return info.source not in ("none", "random-fallback")


def weights_identity(weights: str, arch: str) -> str:
    """What the weights are, for the cache fingerprint: a file's content hash, or the ImageNet file's name."""
    if weights in ("auto", "imagenet"):
        return imagenet_url(arch).rsplit("/", 1)[-1]  # torchvision's file names carry their hash
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def choose_featurizer(arch: str, weights: str, classes: list[str], size: int, recipe: str, device: str = "auto",
                      amp: str = "auto") -> Featurizer:
    """Pooled features of the pretrained backbone, or the perceptual hash when ``weights`` are not pretrained."""
    info = WeightsInfo("none")
    if weights != "none":
        from kennel.model.network import build_model  # torchvision: not needed for the perceptual hash

        model, info = build_model(arch, classes, weights=weights)
    if not pretrained(info):
        log.warning("no pretrained weights (model.weights: %s): near-duplicates use a perceptual hash instead of "
                    "%s features (audit.hash_distance), and label checks are skipped", weights, arch)
        return phash_featurizer(size, recipe)
    dev = resolve_device(device)
    dtype = resolve_amp(amp, dev)
    model = model.to(dev, memory_format=torch.channels_last).eval()
    fingerprint = "|".join([EMBEDDING_VERSION, arch, weights_identity(weights, arch), str(size), recipe,
                            amp_name(dtype)])
    with torch.inference_mode(), model.without_head():
        dim = int(model(torch.zeros(1, 3, size, size, device=dev)).shape[1])

    def compute(images: np.ndarray) -> np.ndarray:
        x = to_device(torch.from_numpy(np.ascontiguousarray(images)), dev)
        with torch.inference_mode(), model.without_head() as body, \
                torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            features = body(x).float() + body(x.flip(-1)).float()
        return torch.nn.functional.normalize(features, dim=1).cpu().numpy()

    log.info("near-duplicates by %s features (%s, %d dims, %s)", arch, info.source, dim, amp_name(dtype))
    return Featurizer("embedding", fingerprint, dim, "float16", compute)

