"""The learning-rate range test (Smith 2015, fastai's lr_find): the lr rises exponentially, one batch per step,
until the smoothed loss diverges; the suggestion is the lr where that loss falls fastest, past the sweep's start.

It trains a throwaway copy of the model the params describe, with the optimizer their recipe trains with, and
writes nothing of the pipeline's.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kennel.core.device import resolve_amp, resolve_device
from kennel.core.params import Params
from kennel.core.plots import save_figure, subplots
from kennel.data.shards import read_split
from kennel.model.features import features_key
from kennel.train.batches import Batches, make_batches
from kennel.train.fine_tune import build_for, fits_resident, load_head, seed_everything, split_features
from kennel.train.loop import StepConfig, train_one_epoch
from kennel.train.probe import fit_probe
from kennel.train.recipe import Phase

log = logging.getLogger(__name__)

SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected (fastai's)
DIVERGED = 4.0  # stop once the smoothed loss is this many times its lowest value


@dataclass
class LRFind:
    lrs: list[float]  # train.lr at each step; each param group ran at its ratio of it
    losses: list[float]  # smoothed
    suggestion: float  # for train.lr, as training uses it
    phase: Phase  # the recipe's phase that was swept
    groups: list[tuple[int, float]]  # (parameters, rate / train.lr) of each param group swept
    swept: str  # which phase of which mode, and its groups' rates, in words


def lr_find(params: Params, data_dir: Path, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0
            ) -> LRFind:
    """Run the range test on ``data_dir``'s train split for the optimizer that ``params``' recipe trains with in
    its sweep phase (the first all-layer phase of ``full`` and ``staged``, the head of ``head``): every param group
    keeps its rate's ratio to ``train.lr`` (the backbone at ``backbone_lr_mult`` of it), so the suggestion is for
    ``train.lr``. A sweep of ``staged``'s second phase starts the head at the linear probe when the recipe does
    (``train.head_init: probe``), as near to where that phase starts as a range test gets without training.
    """
    t = params.train
    device = resolve_device(t.device)
    amp_dtype = resolve_amp(t.amp, device)
    generator = seed_everything(params.seed)
    images, _ = read_split(data_dir, "train")
    resident = fits_resident(images.nbytes, device, t.data_on_device)
    how = dict(resident=resident, batch_size=t.batch_size, device=device, num_workers=t.num_workers)
    batches_of = {k: v for k, v in how.items() if k != "device"}
    key = features_key(params, data_dir, amp_dtype)
    model, recipe, _, frozen = build_for(params, data_dir, device, amp_dtype,  # model.finetune auto decided
                                         batches=batches_of, key=key)
    phase = recipe.sweep_phase()
    recipe.prepare(model, phase)
    batches = make_batches(data_dir, "train", **how, shuffle=True, generator=generator)
    if phase.frozen or (phase.index > 1 and recipe.head_from_probe(fresh=True)):
        features = frozen.features if frozen is not None else \
            [split_features(model, data_dir, split, batches_of, device, amp_dtype, key)[:2]
             for split in ("train", "val", "test")]
        if phase.frozen:
            batches = Batches(features[0][0].to(device), features[0][1], t.batch_size, True, generator)
        else:
            load_head(model, fit_probe(*features, classes=len(model.classes)))
    module = recipe.trained_module(model, phase)
    optimizer = recipe.optimizer(model, phase)
    ratios = [group["lr"] / t.lr for group in optimizer.param_groups]
    criterion = recipe.criterion(read_split(data_dir, "train")[1], len(model.classes), device)
    step = StepConfig(amp_dtype, criterion=criterion, grad_clip=t.grad_clip, augment=recipe.augment(phase),
                      generator=generator, mix=recipe.mix(phase, len(model.classes)))

    lrs, smoothed, average, best = [], [], 0.0, math.inf
    stream = itertools.chain.from_iterable(itertools.repeat(batches))  # as many epochs as the steps need
    bar = tqdm(total=steps, desc="lr-find", unit="step", leave=False, disable=None)  # one bar over every step
    for i, batch in zip(range(steps), stream, strict=False):
        bar.update()
        lr = start_lr * (end_lr / start_lr) ** (i / max(1, steps - 1))
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        loss, _, _ = train_one_epoch(module, [batch], optimizer, device, step, progress=False)
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        value = average / (1 - SMOOTHING ** (i + 1))
        lrs.append(lr)
        smoothed.append(value)
        best = min(best, value)
        if value > DIVERGED * best:
            break
    bar.close()
    groups = [(len(group["params"]), ratio) for group, ratio in zip(optimizer.param_groups, ratios, strict=True)]
    what = "the head on cached features" if phase.frozen else "all layers"
    rates = ", ".join(f"{n} tensors at {ratio:g} x" for n, ratio in groups)
    swept = f"phase {phase.index} of {recipe.finetune} ({what}; {rates} the lr)"
    return LRFind(lrs, smoothed, suggest(lrs, smoothed), phase, groups, swept)


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The lr of the steepest descent of the loss against log(lr), between the sweep's start and the loss's minimum.

    Never the sweep's first or last lr. NaN (with a warning) below 5 points, or when the loss does not
    fall after the start: then there is no descent to read, and no lr is better than a wrong one.
    """
    n = len(lrs)
    if n < 5:
        log.warning("lr-find: %d steps are too few for a suggestion (need 5)", n)
        return math.nan
    x, y = np.log(lrs), np.asarray(losses, dtype=float)
    # The bias-corrected EMA is the mean of only a few batches at the start, so its first steps are batch noise
    # that can look steeper than the real descent (1e-7 on 800 photos): skip them, as fastai does (10%).
    skip = max(3, n // 10)
    stop = skip + int(np.argmin(y[skip:]))  # past the minimum the loss climbs or diverges: cut it off
    if stop == skip:
        log.warning("lr-find: the loss never falls below its value at lr %.3g; no suggestion (lower --start-lr)",
                    lrs[skip])
        return math.nan
    # Slope over +-5% of the sweep, not neighbouring points: the EMA's step-to-step noise averages out over it.
    h = max(1, n // 20)
    i = np.arange(skip, stop)
    lo, hi = np.maximum(i - h, skip), np.minimum(i + h, stop)
    return float(lrs[int(i[np.argmin((y[hi] - y[lo]) / (x[hi] - x[lo]))])])


def plot(result: LRFind, path: Path) -> Path:
    """Loss against lr (log scale), the suggestion marked."""
    fig, ax = subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(result.lrs, result.losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    if math.isfinite(result.suggestion):
        y = result.losses[result.lrs.index(result.suggestion)]
        ax.plot([result.suggestion], [y], "o", color="red", label=f"suggested lr {result.suggestion:.2e}")
        ax.legend()
    ax.set_title("learning-rate range test")
    return save_figure(fig, path)
