"""What an image is compared by: the pretrained backbone's pooled features, or a perceptual hash without them.

The features are those of ``model.arch`` with ``model.weights``, head removed, of each image and of its mirror,
stored as computed (training's frozen phases read them: ``kennel.model.features``) and compared as their
L2-normalised mean (so a mirrored copy gets the same vector up to resampling): their dot product is the cosine
similarity. Random-init features say nothing about content, so without pretrained weights near-copies are found by
a mirror-aware perceptual hash instead, and label checks are skipped.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kennel.audit.phash import phash_featurizer
from kennel.core.device import amp_name, inference_batch, resolve_amp, resolve_device
from kennel.data.vectors import Featurizer
from kennel.model.features import fingerprint, mean_of_pair, pooled_pair, storage_dtype
from kennel.model.weights import WeightsInfo

log = logging.getLogger(__name__)


def pretrained(info: WeightsInfo) -> bool:
    return info.source not in ("none", "random-fallback")


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
    probe = pooled_pair(model, np.zeros((1, 3, size, size), np.uint8), dev, dtype)
    stored = storage_dtype(probe.dtype)

    def compute(images: np.ndarray) -> np.ndarray:
        return pooled_pair(model, images, dev, dtype).to(getattr(torch, stored)).cpu().numpy()

    dim = probe.shape[1] // 2
    log.info("near-duplicates by %s features (%s, %d dims, %s)", arch, info.source, dim, amp_name(dtype))
    return Featurizer("embedding", fingerprint(arch, weights, size, recipe, dtype), 2 * dim, stored, compute,
                      view=mean_of_pair, batch=inference_batch(dev))

