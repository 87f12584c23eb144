"""``evaluate.tta: auto``: whether the images have an "up", asked of the linear probe on the pretrained features.

A tile seen from above or a slide under a microscope is the same image turned a quarter; a pet or a chest X-ray is
not. The probe, fit on the images as they are, tells which: on val images turned a quarter its log loss stays
where it is on their mirrors (a turn that carries no meaning), or it rises well above it (the classes look
different upside down). Where turns carry no meaning, averaging the model over the eight turns and mirrors of each
image (``dihedral``) is free accuracy at eight passes per image; elsewhere the model sees each image once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kennel.core.device import inference_batch
from kennel.data.shards import read_split
from kennel.model.features import cached_pairs, pooled
from kennel.model.network import Classifier
from kennel.train.probe import Probe

# Turned images may cost the probe this many times its loss on mirrored ones (plus TURN_SLACK) and still count as
# having no "up". Measured in pipeline runs (benchmarks/RESULTS.md): satellite tiles 1.31x, chest X-rays 1.53x,
# pet photos ~9x; the line sits between the two close ones.
TURN_RATIO = 1.4
TURN_SLACK = 0.01  # nats: near-perfect probes differ by noise alone


def orientation_losses(model: Classifier, probe: Probe, data_dir: Path, device: torch.device,
                       amp_dtype: torch.dtype | None, key: str | None) -> tuple[float, float]:
    """The probe's val log loss on the val images turned a quarter, and on their mirrors (from the audit's cache
    under ``key`` when it holds them: each stored pair's second half); NaN for both without val images."""
    images, labels = read_split(data_dir, "val")
    if len(labels) == 0:
        return math.nan, math.nan
    from sklearn.metrics import log_loss  # loaded already: the probe was fit with it

    model.eval()
    batch = inference_batch(device)

    def features(view: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return np.concatenate([pooled(model, view(images[i:i + batch]), device, amp_dtype)
                               for i in range(0, len(images), batch)])

    turned = features(lambda batch: np.rot90(batch, 1, axes=(2, 3)))
    cached = cached_pairs(data_dir, "val", key) if key else None
    if cached is not None:
        stored = cached[0]
        mirrored = stored[:, stored.shape[1] // 2:].astype(np.float32)
    else:
        mirrored = features(lambda batch: batch[..., ::-1])
    classes = range(len(probe.bias))
    return tuple(float(log_loss(labels, probe.predict_proba(f.astype(np.float64)), labels=classes))
                 for f in (turned, mirrored))


def decide_tta(turned: float, mirrored: float) -> tuple[str, str]:
    """``evaluate.tta`` auto's choice from the two losses, and its reason in words (the run's tag)."""
    losses = f"the linear probe's val log loss on val images turned a quarter {turned:.4f}, on their mirrors " \
             f"{mirrored:.4f}"
    if math.isnan(turned):
        return "none", "none: no val images to judge the images' orientation by (evaluate.tta auto)"
    if turned <= TURN_RATIO * mirrored + TURN_SLACK:
        return "dihedral", (f"dihedral: the images have no \"up\" ({losses}); the model averages each image's "
                            "eight turns and mirrors (evaluate.tta auto)")
    return "none", f"none: turned images are other images to this data ({losses}) (evaluate.tta auto)"
