"""On-device augmentation: a per-image policy (TrivialAugmentWide, RandAugment), per-sample random resized crop,
flips and quarter turns for a whole batch, and mixup / cutmix of a batch with itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torchvision.transforms import v2

from kennel.core.device import send

POLICIES = {"trivial": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}


@dataclass(frozen=True)
class Augment:
    """Per-sample random resized crop, horizontal and vertical flips and quarter turns for a whole batch, with one
    ``grid_sample``.

    Parameters are drawn on the CPU from ``generator`` (so a run is repeatable and resumable on any device, and
    draws the same crops on each); they reach the device without a blocking copy, and the sampling runs wherever
    the images are. Vertical flips and quarter turns draw nothing when off, so a recipe without them draws what it
    always drew.
    """

    flip: float = 0.5
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    vflip: float = 0.0  # overhead and microscope images have no "up"
    rot90: bool = False  # a quarter turn 0-3 times, each equally likely
    policy: str = "none"  # none | trivial | randaugment: one more op per image, on the uint8 image, first

    @classmethod
    def from_params(cls, a) -> Augment | None:
        """``train.augment`` as an Augment; None when every part is off."""
        return cls(a.flip, (a.scale_min, a.scale_max), (a.ratio_min, a.ratio_max), a.vflip, a.rot90, a.policy) \
            if a.enabled else None

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.policy != "none":
            # torchvision's policies draw one op for whatever they are given: one call per image, so each image
            # gets its own (from torch's global generator, which the checkpoint keeps)
            policy = POLICIES[self.policy]()
            images = torch.stack([policy(image) for image in images])
        b = images.shape[0]
        area = torch.empty(b).uniform_(*self.scale, generator=generator)
        log_ratio = torch.empty(b).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=generator)
        w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop size as a fraction of the side
        h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)  # crop centre, in [-1, 1] coordinates
        cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
        sign = 1 - 2 * (torch.rand(b, generator=generator) < self.flip).float()
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
        if self.vflip > 0:
            theta[:, 1, 1] *= 1 - 2 * (torch.rand(b, generator=generator) < self.vflip).float()
        if self.rot90:
            # the output's coordinates turned by k quarter turns before the crop's scale and flips apply: exact
            # on the pixel grid of a square image
            k = torch.randint(0, 4, (b,), generator=generator)
            cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[k]
            sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[k]
            turn = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # b x 2 x 2
            theta[:, :, :2] = theta[:, :, :2] @ turn
        theta = send(theta, images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return out.contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Mix:
    """mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019) of a batch with itself in another order, from
    torchvision.transforms.v2: the labels become each image's class shares (one of the two per batch when both are
    on). Drawn from torch's global generator, which the checkpoint keeps."""

    mixup: float  # alpha; 0 = off
    cutmix: float
    classes: int

    @classmethod
    def from_params(cls, a, classes: int) -> Mix | None:
        return cls(a.mixup, a.cutmix, classes) if a.mixup > 0 or a.cutmix > 0 else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixes = [m for alpha, m in ((self.mixup, v2.MixUp), (self.cutmix, v2.CutMix)) if alpha > 0]
        alphas = [a for a in (self.mixup, self.cutmix) if a > 0]
        chosen = int(torch.randint(len(mixes), ())) if len(mixes) > 1 else 0
        return mixes[chosen](alpha=alphas[chosen], num_classes=self.classes)(images, labels)
