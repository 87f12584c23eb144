"""Optimizer and per-step learning-rate schedule from ``train.*`` params."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


def build_optimizer(
    name: str, params: Iterable[nn.Parameter] | Iterable[dict], lr: float, momentum: float = 0.9,
    weight_decay: float = 0.0, nesterov: bool = False,
) -> torch.optim.Optimizer:
    """Parameters, or param groups (dicts with their own ``lr``); frozen parameters are left out."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer = {name!r}: allowed: sgd | adam | adamw")


@dataclass(frozen=True)
class WarmupCosine:
    """LR factor per step: linear warmup from ~0 to 1, then cosine down to 0. A class, so it pickles."""

    total_steps: int
    warmup_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step schedule: ``none``, ``cosine`` (with ``warmup_epochs`` of linear warmup) or ``onecycle``."""
    total = max(1, epochs * steps_per_epoch)
    if name == "none":
        return None
    if name == "cosine":
        warmup = min(total - 1, round(warmup_epochs * steps_per_epoch))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup))
    if name == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total)
    raise ValueError(f"train.schedule = {name!r}: allowed: none | cosine | onecycle")
