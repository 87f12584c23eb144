"""train(params, data_dir): the run around the recipe: device, data placement, each phase set up and fitted,
checkpoints and resume, the weights kept (selection, blend, refit)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kennel.core.device import amp_name, inference_batch, resolve_amp, resolve_device
from kennel.core.params import Params
from kennel.data.shards import read_meta, read_split
from kennel.model.features import cached_features, features_key
from kennel.model.network import Classifier, build_model, ensemble_state
from kennel.model.statistics import batchnorm_shift
from kennel.model.weights import WeightsInfo
from kennel.train.balance import balance_warnings, weighs, weights_reason
from kennel.train.batches import Batches, make_batches
from kennel.train.checkpoint import Checkpointer, restore_run
from kennel.train.distributed import Dist
from kennel.train.loop import EpochResult, FitState, StepConfig, evaluate, fit, predict, snapshot
from kennel.train.orientation import decide_tta, orientation_losses
from kennel.train.probe import PROBE_CS, Probe, below_probe_warning, fit_probe
from kennel.train.recipe import BLENDS, Phase, Recipe, blend_weights

log = logging.getLogger(__name__)

TRAIN_VAL = ("train", "val")  # the splits a run trains and validates on
REFIT = ("train+val", "")  # a refit: both together, nothing held out for validation
# Share of free device memory (or available RAM) the uint8 train + val splits may take to be held resident.
RESIDENT_FRACTION = 0.25
BN_SAMPLE = 128  # train images the BatchNorm shift is measured on (one forward pass: seconds)


@dataclass
class TrainResult:
    model: Classifier
    history: list[EpochResult]
    weights: WeightsInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    data_placement: str = ""  # "device" (resident) or "stream" (DataLoader from the memory map)
    resumed_from: int = 0  # epoch of the checkpoint resumed, 0 for a fresh start
    epochs: int = 0  # the budget trained to (train.epochs, or what auto decided)
    probe: Probe | None = None  # the linear probe on the pretrained features (runs with a frozen phase)
    # train.refit: the images the final weights (true) or the further ensemble members (members) trained on
    refit_images: int = 0
    # train.blend: (val loss, val accuracy) of the blended weights kept, which are no epoch's; None otherwise
    blended_val: tuple[float, float] | None = None
    blend: float | None = None  # the blend weight kept (train.blend, or the one auto chose)
    # train.ensemble > 1: (val loss, val accuracy) of the ensemble kept, then of each member's last epoch alone
    ensemble_val: tuple[float, float] | None = None
    members_val: list[tuple[float, float]] = field(default_factory=list)
    selected_epoch: int = 0  # the epoch whose weights the model holds
    selected_reason: str = ""  # why those weights, in words (logged, tagged on the run, in its note)
    decisions: dict[str, str] = field(default_factory=dict)  # what the recipe decided from the data, and why
    tta: str = "none"  # evaluate.tta, or what auto decided: stored with the model

    def baseline_metrics(self) -> dict[str, float]:
        """The probe's scores (baseline_val_accuracy, baseline_test_accuracy, baseline_c); none without a probe."""
        return self.probe.metrics() if self.probe is not None else {}

    def below_baseline(self) -> str:
        """A warning when the kept weights score below the probe on val, else ""."""
        accuracy = self.kept_val_accuracy()
        return below_probe_warning(accuracy, self.probe) if accuracy is not None else ""

    def kept_val_accuracy(self) -> float | None:
        """Val accuracy of the weights the model holds: the blend's, the ensemble's, else the selected epoch's."""
        if self.blended_val is not None:
            return self.blended_val[1]
        if self.ensemble_val is not None:
            return self.ensemble_val[1]
        kept = next((r for r in self.history if r.epoch == self.selected_epoch), None)
        return kept.val_accuracy if kept is not None else None


def seed_everything(seed: int) -> torch.Generator:
    """Seeds the global RNGs (model init) and returns the generator for shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable results
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True  # fastest conv algorithms for the fixed input size


def fits_resident(nbytes: int, device: torch.device, setting: str | bool) -> bool:
    """``train.data_on_device``: true, false, or auto = fits in a quarter of free device memory / available RAM."""
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= RESIDENT_FRACTION * free
    if device.type == "cpu" and hasattr(os, "sysconf"):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return nbytes <= RESIDENT_FRACTION * available
    return False


def extract_features(model: Classifier, batches: Iterable, device: torch.device,
                     amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (the head's input) for every image, computed once."""
    with model.without_head():
        return predict(model, batches, device, amp_dtype, desc="features")


def split_features(model: Classifier, data_dir: Path, split: str, batches: dict, device: torch.device,
                   amp_dtype: torch.dtype | None, key: str | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The pretrained backbone's features of ``split`` and its labels: read from the audit's cache when it holds
    every image under ``key`` (the same backbone, weights, pixels and precision), else one pass through the
    backbone (``model`` as loaded: frozen phases come first). The flag says whether they came from the cache."""
    cached = cached_features(data_dir, split, key) if key else None
    if cached is not None:
        return *cached, True
    return *extract_features(model, make_batches(data_dir, split, **for_inference(batches, device), device=device),
                             device, amp_dtype), False


def for_inference(batches: dict, device: torch.device) -> dict:
    """``make_batches``' keywords ``batches`` for a pass without gradients: the device's inference batch."""
    return {**batches, "batch_size": inference_batch(device, batches["batch_size"])}


def _model_state(model: Classifier, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A best state kept in a frozen phase (the head's keys only) as the whole model's: the backbone did not move."""
    if state is None or any(k.startswith("backbone.") for k in state):
        return state
    prefix = f"backbone.{model.head_name}."
    return {**snapshot(model),
            **{prefix + k: v for k, v in state.items()}}


def build_for(params: Params, data_dir: Path, device: torch.device, amp_dtype: torch.dtype | None = None,
              probe_cs: Sequence[float] = PROBE_CS, batches: dict | None = None, key: str | None = None
              ) -> tuple[Classifier, Recipe, WeightsInfo, FrozenStart | None]:
    """``params``' model for ``data_dir``'s classes, on ``device`` in channels_last, unfrozen, and the recipe that
    fine-tunes it, with what it decides from the data settled: ``model.finetune: auto`` by the linear probe on the
    pretrained features (returned with them, so the head's phase does not compute them again), then BatchNorm by
    the shift of the first train images. ``batches``: how the features' batches are made (``make_batches``'
    resident, batch_size, num_workers; default: streamed at ``train.batch_size``); ``key``: the audit's cache
    holds them under it (``features_key``). Seed the RNG first."""
    model, weights = build_model(params.model.arch, read_meta(data_dir)["classes"], params.model.weights)
    model = model.to(device, memory_format=torch.channels_last)
    recipe = Recipe.from_params(params, weights.loaded > 0)
    frozen = None
    if recipe.decides_on_probe:
        how = batches or dict(resident=False, batch_size=params.train.batch_size,
                              num_workers=params.train.num_workers)
        frozen = frozen_start(model, data_dir, TRAIN_VAL, device, amp_dtype, how, probe_cs, key)
        recipe = recipe.decide(frozen.probe.val_accuracy)
    recipe = recipe.decide()
    if recipe.measures_bn:
        images, _ = read_split(data_dir, "train")
        sample = torch.from_numpy(np.array(images[:BN_SAMPLE])).to(device)
        recipe = dataclasses.replace(recipe, bn_shift=batchnorm_shift(model, sample))
    return model, recipe, weights, frozen


@dataclass
class FrozenStart:
    """The pretrained backbone's features of the run's splits and the linear probe fit on them: what a frozen phase
    starts from (computed once, while the backbone has not moved)."""

    splits: tuple[str, str]
    features: list[tuple[torch.Tensor, torch.Tensor]]  # (features, labels) of train, val, test
    probe: Probe


def frozen_start(model: Classifier, data_dir: Path, splits: tuple[str, str], device: torch.device,
                 amp_dtype: torch.dtype | None, batches: dict, probe_cs: Sequence[float] = PROBE_CS,
                 key: str | None = None) -> FrozenStart:
    """Features of ``splits`` and the test split (from the audit's cache under ``key``, else computed in batches
    made as ``batches`` say) and the probe fit on them."""
    got = [split_features(model, data_dir, split, batches, device, amp_dtype, key) for split in (*splits, "test")]
    features = [(x, y) for x, y, _ in got]
    n, cached = sum(len(y) for _, y in features), sum(len(y) for _, y, hit in got if hit)
    log.info("pretrained features of %d images: %s", n, "read from the audit's cache" if cached == n else
             f"{n - cached} computed" + (f", {cached} read from the audit's cache" if cached else ""))
    return FrozenStart(splits, features, fit_probe(*features, classes=len(model.classes), cs=probe_cs))


@dataclass(frozen=True)
class PhaseData:
    """Where a run's phases take their batches from: the same for every phase of the run."""

    dir: Path
    splits: tuple[str, str]
    resident: bool  # train + val held on the device
    batch_size: int  # per process
    device: torch.device
    amp_dtype: torch.dtype | None
    generator: torch.Generator
    ctx: Dist
    train_labels: np.ndarray  # the train split's, for the loss's class weights
    features_key: str | None = None  # the audit's cache holds the pretrained features under it


@dataclass
class PhaseSetup:
    """What one phase trains with: the module that learns, its batches, optimizer, schedule and step recipe."""

    trained: nn.Module  # what the optimizer updates, wrapped for DDP / torch.compile when asked
    evaluated: nn.Module  # what validation runs (the head alone on cached features, else the model)
    train_batches: Iterable
    val_batches: Iterable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    step: StepConfig
    probe: Probe | None = None


def setup_phase(phase: Phase, recipe: Recipe, model: Classifier, data: PhaseData, fresh: bool = True,
                probe_cs: Sequence[float] = PROBE_CS, frozen: FrozenStart | None = None) -> PhaseSetup:
    """The data, module, optimizer, schedule and grad scaler of ``phase``, as ``recipe`` says.

    Frozen: the backbone's features never change, so they are computed once and the head trains on them
    (no augmentation); the linear probe is fit on them, and the head may start from it (``fresh`` false: the
    phase resumes, and the checkpoint's head stands); ``frozen`` holds them when they were computed already. All
    layers: batches of images, augmented on the device.
    """
    recipe.prepare(model, phase)
    device, ctx = data.device, data.ctx
    batches = dict(resident=data.resident, batch_size=data.batch_size, device=device,
                   num_workers=recipe.train.num_workers)
    probe = None
    if phase.frozen:
        log.info("epochs %d-%d: head only, on backbone features computed once (no augmentation)",
                 phase.first, phase.last)
        if frozen is None or frozen.splits != data.splits:  # else computed already, to decide model.finetune
            frozen = frozen_start(model, data.dir, data.splits, device, data.amp_dtype,
                                  {k: v for k, v in batches.items() if k != "device"}, probe_cs, data.features_key)
        (ftrain, ytrain), (fval, yval), _ = frozen.features
        probe = frozen.probe
        if recipe.head_from_probe(fresh):
            load_head(model, probe)
        ftrain, fval = ftrain.to(device), fval.to(device)
        train_batches: Iterable = Batches(ftrain, ytrain, data.batch_size, True, data.generator, ctx.rank, ctx.world)
        val_batches: Iterable = Batches(fval, yval, data.batch_size, rank=ctx.rank, world=ctx.world)
    else:
        # train.refit members: a further member learns from val too, and nothing is left to validate it on
        on_val = recipe.trains_on_val(phase)
        splits = REFIT if on_val else data.splits
        log.info("epochs %d-%d: all layers%s, BatchNorm statistics %s%s", phase.first, phase.last,
                 f", backbone lr x {recipe.train.backbone_lr_mult:g}" if recipe.discriminative(phase) else "",
                 "kept as loaded (train.freeze_bn)" if model.freeze_bn else "updated",
                 ", on train + val (train.refit members: nothing held out)" if on_val else "")
        train_batches = make_batches(data.dir, splits[0], **batches, shuffle=True, generator=data.generator,
                                     rank=ctx.rank, world=ctx.world)
        val_batches = make_batches(data.dir, splits[1], **for_inference(batches, device), rank=ctx.rank,
                                   world=ctx.world)
    module = recipe.trained_module(model, phase)
    trained = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.world > 1 else module
    if recipe.train.compile:
        trained = torch.compile(trained)
    optimizer = recipe.optimizer(model, phase)
    scheduler = recipe.scheduler(optimizer, phase, len(train_batches))
    scaler = torch.amp.GradScaler(device.type) if data.amp_dtype == torch.float16 else None
    criterion = recipe.criterion(data.train_labels, len(model.classes), device)
    step = StepConfig(data.amp_dtype, scaler, scheduler, criterion, recipe.train.grad_clip, recipe.augment(phase),
                      data.generator, recipe.mix(phase, len(model.classes)))
    return PhaseSetup(trained, module, train_batches, val_batches, optimizer, scheduler, scaler, step, probe)


def load_head(model: Classifier, probe: Probe) -> None:
    """Start the head at the probe's solution (linear probing, then fine-tuning): the backbone then trains
    against a head that is already right, not against a random one whose gradients distort the features."""
    head = model.head
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(probe.weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(probe.bias, dtype=head.bias.dtype))


def train(
    params: Params,
    data_dir: Path,
    *,
    on_epoch: Callable[[EpochResult], None] = lambda r: None,
    on_start: Callable[[TrainResult], None] = lambda r: None,
    checkpoint: Path | None = None,
    resume: dict | None = None,
    checkpoint_extra: dict | None = None,
    ctx: Dist | None = None,
    splits: tuple[str, str] = TRAIN_VAL,
    probe_cs: Sequence[float] = PROBE_CS,
    recipe: Recipe | None = None,
) -> TrainResult:
    """Fine-tune per ``params`` on ``data_dir``'s train split, validating on val after every epoch (``splits``
    names others: a refit trains on ``train+val`` and validates on nothing). The recipe is the one ``params``
    describe for the weights loaded, unless ``recipe`` is given (a refit's).

    With ``checkpoint``, the state after every epoch is saved there (by rank 0); ``resume`` (a payload from
    ``find_resumable``) continues such a run, in either phase of ``staged``, so that it ends exactly where an
    uninterrupted one would. ``on_start`` sees the built model, device and placement before the first epoch.
    """
    ctx = ctx or Dist()
    device, amp_dtype, generator = prepare_run(params, ctx)
    resident, n_train, n_val = placement(data_dir, device, params.train.data_on_device, splits)
    # the batches a frozen phase computes features from, for auto's probe too: the same floats either way
    batches = dict(resident=resident, batch_size=params.train.batch_size // ctx.world,
                   num_workers=params.train.num_workers)
    key = features_key(params, data_dir, amp_dtype)
    tta, tta_reason = params.evaluate.tta, ""
    if recipe is None:
        model, recipe, weights, frozen = build_for(params, data_dir, device, amp_dtype, probe_cs, batches, key)
        if tta == "auto":  # before a resume loads trained weights: the probe judges the pretrained features
            tta, tta_reason, frozen = auto_tta(model, weights, frozen, data_dir, device, amp_dtype, batches,
                                               probe_cs, key)
    else:  # a refit's, decided already (its caller keeps the selection run's tta)
        model, _, weights, frozen = build_for(dataclasses.replace(params, model=dataclasses.replace(
            params.model, finetune=recipe.finetune)), data_dir, device)
    t = recipe.train
    train_labels, val_labels = (read_split(data_dir, split)[1] for split in splits)
    data = PhaseData(data_dir, splits, resident, batches["batch_size"], device, amp_dtype, generator, ctx,
                     train_labels, key)
    saver = Checkpointer.for_run(checkpoint, params, data_dir, checkpoint_extra) if checkpoint else None
    state, start = restore_run(resume, model, generator) if resume is not None else (FitState(), 1)
    result = TrainResult(model, state.history, weights, device, amp_dtype, "device" if resident else "stream",
                         resumed_from=start - 1, epochs=recipe.total_epochs, tta=tta)
    log.info("training on %s (amp %s, data %s), %d train / %d val images, batch %d x %d processes, weights %s%s",
             device, amp_name(amp_dtype), result.data_placement, n_train, n_val, data.batch_size, ctx.world,
             weights.source, f", resuming after epoch {start - 1}" if start > 1 else "")
    log.info("model.finetune %s: %s; %s, %s schedule", recipe.finetune, "; then ".join(recipe.describe()),
             t.optimizer, t.schedule)
    result.decisions["finetune"] = recipe.finetune_reason()
    if recipe.auto:
        log.info("model.finetune %s", result.decisions["finetune"])
    result.decisions["batchnorm"] = recipe.batchnorm_reason()
    log.info("BatchNorm statistics %s", result.decisions["batchnorm"])
    result.decisions["class_weights"] = weights_reason(t.class_weights, train_labels, len(model.classes))
    log.info("class weights in the loss: %s", result.decisions["class_weights"])
    for key, reason in recipe.budget_reasons().items():
        result.decisions[key] = reason
        log.info("train.%s %s", key, reason)
    if t.ensemble > recipe.members:  # set by hand for a run that trains the head alone
        result.decisions["ensemble"] = (f"1: model.finetune {recipe.finetune} trains no all-layer phase to repeat "
                                        f"(train.ensemble {t.ensemble})")
        log.warning("train.ensemble %s", result.decisions["ensemble"])
    if t.refit == "members" and not recipe.members_see_val:  # by hand, with no second member to train
        result.decisions["refit"] = "false: one model, no further ensemble member to train on val (train.refit " \
                                    "members)"
        log.warning("train.refit %s", result.decisions["refit"])
    if tta_reason:
        result.decisions["tta"] = tta_reason
        log.info("evaluate.tta %s", tta_reason)
    for warning in balance_warnings(train_labels, val_labels, model.classes,
                                    weighs(t.class_weights, train_labels, len(model.classes))):
        log.warning(warning)
    on_start(result)

    evaluated: nn.Module = model
    setup: PhaseSetup | None = None
    for phase in recipe.phases:
        if phase.last < start:
            continue  # finished before the checkpoint we resume from
        if not phase.frozen and phase.index > 1:
            state.best_state = _model_state(model, state.best_state)
        if not phase.frozen and start <= phase.first:  # a run resumed inside the phase has these from the checkpoint
            if recipe.keeps_start(phase):  # to blend back toward, and for further ensemble members
                state.start_state = snapshot(model)
            if phase.member > 1:  # the member before is done: this one starts where it did
                state.members.append(snapshot(model))
                model.load_state_dict(state.start_state)
        setup = setup_phase(phase, recipe, model, data, fresh=start <= phase.first, probe_cs=probe_cs,
                            frozen=frozen)
        if resume is not None:
            recipe.restore(resume, phase, setup.optimizer, setup.scheduler, setup.scaler)

        def after_epoch(epoch_result: EpochResult, fit_state: FitState, phase=phase, setup=setup) -> None:
            # Report first, then checkpoint: a kill in between repeats this epoch on resume (same numbers, logged
            # twice) rather than skipping its report.
            on_epoch(epoch_result)
            if saver is not None and ctx.is_main:
                saver.save(epoch=epoch_result.epoch, phase=phase.index, model=model, optimizer=setup.optimizer,
                           scheduler=setup.scheduler, scaler=setup.scaler, generator=generator, state=fit_state)

        evaluated = setup.evaluated
        if setup.probe is not None:
            result.probe = state.probe = setup.probe
        state = fit(setup.trained, setup.train_batches, setup.val_batches, setup.optimizer, phase.last, device,
                    setup.step, eval_model=evaluated, state=state, start_epoch=max(start, phase.first),
                    on_epoch=after_epoch, patience=t.patience, since=phase.first - 1)
    result = select_weights(result, model, state, evaluated, t.select, recipe.total_epochs)
    if state.stopped_after:
        result.selected_reason += (f"; training stopped after epoch {state.stopped_after}: val loss had not improved "
                                   f"for {t.patience} epochs (train.patience)")
    if state.members and setup is not None:
        result.ensemble_val = ensemble_kept(model, state.members, setup.val_batches, device, amp_dtype)
        result.members_val = member_scores(state.history, recipe.phases)
        kept = ensemble_reason(result.ensemble_val, result.members_val, recipe.phases, recipe.members_see_val)
        result.selected_reason += f"; then {kept}"
        why = result.decisions.get("ensemble", f"{recipe.members}: train.ensemble")
        result.decisions["ensemble"] = f"{why} ({kept})"
        log.info("kept %s", kept)
    if (recipe.blends_back and state.start_state is not None and setup is not None
            and result.selected_epoch > t.head_epochs):
        result.blend, result.blended_val, tried = blend_kept(model, state.start_state, t.blend, setup.val_batches,
                                                             device, amp_dtype)
        result.selected_reason += blend_reason(result.blend, result.selected_epoch, result.blended_val, tried)
        if tried:
            result.decisions["blend"] = blend_decision(result.blend, tried)
        log.info("blended: %s", result.selected_reason.rsplit("; ", 1)[-1])
    if recipe.members_see_val:  # the further members' images: train + val, as counted for placement
        result.refit_images = n_train + n_val
    return refit(params, data_dir, result, recipe, ctx) if t.refit is True else result


def auto_tta(model: Classifier, weights: WeightsInfo, frozen: FrozenStart | None, data_dir: Path,
             device: torch.device, amp_dtype: torch.dtype | None, batches: dict, probe_cs: Sequence[float],
             key: str | None) -> tuple[str, str, FrozenStart | None]:
    """``evaluate.tta: auto``: dihedral where the images have no "up" (``kennel.train.orientation``), else none;
    the reason; and the frozen start it fit the probe on (a frozen phase then starts from it)."""
    if not weights.loaded:
        return "none", "none: no pretrained features to judge the images' orientation by (evaluate.tta auto)", frozen
    frozen = frozen or frozen_start(model, data_dir, TRAIN_VAL, device, amp_dtype, batches, probe_cs, key)
    tta, reason = decide_tta(*orientation_losses(model, frozen.probe, data_dir, device, amp_dtype, key))
    return tta, reason, frozen


def blend_kept(model: nn.Module, start: dict[str, torch.Tensor], blend: float | str, val_batches: Iterable,
               device: torch.device, amp_dtype: torch.dtype | None
               ) -> tuple[float, tuple[float, float], dict[float, tuple[float, float]]]:
    """Blend the model's weights toward ``start`` (``train.blend``; auto: each of ``BLENDS`` scored on val, the
    lowest loss kept). Returns the weight, the kept weights' (val loss, val accuracy) and, for auto, each
    candidate's."""
    if blend != "auto":
        blend_weights(model, start, blend)
        return blend, evaluate(model, val_batches, device, amp_dtype), {}
    kept = snapshot(model)
    tried = {}
    for weight in BLENDS:
        model.load_state_dict(kept)
        blend_weights(model, start, weight)
        tried[weight] = evaluate(model, val_batches, device, amp_dtype)
    scored = [w for w in BLENDS if not math.isnan(tried[w][0])]
    best = min(scored, key=lambda w: tried[w][0]) if scored else 0.5  # no val split: halfway
    model.load_state_dict(kept)
    blend_weights(model, start, best)
    return best, tried[best], tried


def ensemble_kept(model: Classifier, earlier: list[dict[str, torch.Tensor]], val_batches: Iterable,
                  device: torch.device, amp_dtype: torch.dtype | None) -> tuple[float, float]:
    """The model becomes the ensemble of the ``earlier`` members' weights and its own (the last member's), in that
    order (``train.ensemble``); returns the ensemble's (val loss, val accuracy)."""
    states = [*earlier, snapshot(model)]
    model.add_members(len(earlier))
    model.load_state_dict(ensemble_state(states))
    return evaluate(model, val_batches, device, amp_dtype)


def member_scores(history: list[EpochResult], phases: list[Phase]) -> list[tuple[float, float]]:
    """(val loss, val accuracy) of each ensemble member's last epoch (all-layer phases, in order)."""
    return [next((r.val_loss, r.val_accuracy) for r in reversed(history) if p.first <= r.epoch <= p.last)
            for p in phases if not p.frozen]


def ensemble_reason(kept: tuple[float, float], members: list[tuple[float, float]], phases: list[Phase],
                    members_see_val: bool = False) -> str:
    """The ensemble kept, in words, with its val numbers and its members' (the selection reason, the decision);
    ``members_see_val``: the members after the first trained on val (train.refit members), and only the first has a
    held-out score."""
    ends = [str(p.last) for p in phases if not p.frozen]
    if members_see_val:
        first = members[0]
        scores = ("members after the first trained on train + val (train.refit members), so only the first has a "
                  "val score: " + ("no val split" if math.isnan(first[0]) else
                                   f"val loss {first[0]:.4f}, accuracy {first[1]:.4f}"))
    elif math.isnan(kept[0]):
        scores = "no val split"
    else:
        scores = (f"val loss {kept[0]:.4f}, accuracy {kept[1]:.4f}, each alone "
                  + ", ".join(f"{loss:.4f} / {acc:.4f}" for loss, acc in members))
    return (f"the ensemble of {len(ends)} all-layer runs, each's last epoch ({', '.join(ends)}), logits averaged "
            f"(train.ensemble): {scores}")


def blend_decision(blend: float, tried: dict[float, tuple[float, float]]) -> str:
    """``train.blend: auto``'s choice and every candidate's val loss, in words (the run's tag)."""
    scores = ", ".join(f"{w:g}: {loss:.4f}" for w, (loss, _) in tried.items())
    return f"{blend:g}: the lowest val loss of the weights tried ({scores}; train.blend auto)"


def blend_reason(blend: float, epoch: int, val: tuple[float, float], tried: dict | None = None) -> str:
    """What the selection reason gains when the kept weights are a blend, with the blend's own val numbers."""
    scores = f"val loss {val[0]:.4f}, accuracy {val[1]:.4f}" if not math.isnan(val[0]) else "no val split"
    how = f"train.blend auto, the lowest val loss of {', '.join(f'{w:g}' for w in tried)}" if tried else \
        "train.blend"
    return (f"; then blended {blend:g} x epoch {epoch} + {1 - blend:g} x the frozen phase's weights "
            f"({how}): {scores}")


def refit(params: Params, data_dir: Path, selected: TrainResult, recipe: Recipe, ctx: Dist) -> TrainResult:
    """The selected recipe trained again from the start on train + val for the selected number of epochs (staged
    that selected a frozen epoch: the head alone), the probe's C as chosen: all labelled photos but the test's
    end up in the model. Nothing is left to validate on, so the selection run's history stays the one reported."""
    k = selected.selected_epoch
    again_recipe = recipe.for_refit(k, selected.blend)
    log.info("refit: %s for %d epoch(s) on train + val, as selected", again_recipe.finetune, k)
    again = train(params, data_dir, ctx=ctx, splits=REFIT, recipe=again_recipe,
                  probe_cs=(selected.probe.c,) if selected.probe else PROBE_CS)
    return dataclasses.replace(again, history=selected.history, selected_epoch=k, probe=selected.probe,
                               selected_reason=f"{selected.selected_reason}; then trained again on train + val "
                                               f"for {k} epoch(s) (train.refit)"
                                               f"{', blended the same way' if again.blended_val else ''}",
                               blended_val=selected.blended_val, ensemble_val=selected.ensemble_val,
                               members_val=selected.members_val, tta=selected.tta,
                               decisions={**again.decisions, **{k: v for k, v in selected.decisions.items()
                                                                 if k == "tta"}},
                               refit_images=sum(len(read_split(data_dir, s)[1]) for s in REFIT[0].split("+")))


def prepare_run(params: Params, ctx: Dist) -> tuple[torch.device, torch.dtype | None, torch.Generator]:
    """Device (this process's GPU under DDP), precision, determinism and seeds, before the model is built."""
    device = resolve_device(params.train.device)
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", ctx.local_rank)
    set_determinism(params.train.deterministic)
    return device, resolve_amp(params.train.amp, device), seed_everything(params.seed)


def placement(data_dir: Path, device: torch.device, setting: str | bool,
              splits: tuple[str, str] = TRAIN_VAL) -> tuple[bool, int, int]:
    """(resident: train + val held on the device, train images, val images); an empty train split is an error."""
    train_images, _ = read_split(data_dir, splits[0])
    val_images, _ = read_split(data_dir, splits[1])
    if len(train_images) == 0:
        raise ValueError(f"{data_dir}: the train split is empty")
    return fits_resident(train_images.nbytes + val_images.nbytes, device, setting), len(train_images), len(val_images)


def select_weights(result: TrainResult, model: Classifier, state: FitState, evaluated: nn.Module, select: str,
                   epochs: int) -> TrainResult:
    """The model with the weights ``train.select`` keeps: the best validation epoch's, or the last's."""
    model.set_frozen(False)
    result.history = state.history
    result.selected_epoch = state.history[-1].epoch
    if select == "best" and state.best_state is not None:
        evaluated.load_state_dict(state.best_state)
        result.selected_epoch = state.best_epoch
    result.selected_reason = selection_reason(state.history, result.selected_epoch, select)
    result.probe = state.probe
    log.info("kept the weights of epoch %d of %d: %s", result.selected_epoch, epochs, result.selected_reason)
    return result


def selection_reason(history: list[EpochResult], selected: int, select: str) -> str:
    """Why epoch ``selected`` was kept, with the epochs that tie it on val accuracy (which cannot tell them apart)."""
    if select == "last" or not history:
        return "train.select: last"
    kept = next(r for r in history if r.epoch == selected)
    tied = [r.epoch for r in history if r.val_accuracy == kept.val_accuracy]
    best_acc = max(r.val_accuracy for r in history)
    reason = f"lowest val loss {kept.val_loss:.4f} (val accuracy {kept.val_accuracy:.4f}"
    if len(tied) > 1:
        reason += f", as in epoch{'s' if len(tied) > 2 else ''} " + ", ".join(str(e) for e in tied if e != selected)
    reason += ")"
    if best_acc > kept.val_accuracy:
        top = [r.epoch for r in history if r.val_accuracy == best_acc]
        reason += f"; epoch {', '.join(map(str, top))} had val accuracy {best_acc:.4f} at a higher loss"
    return reason


def find_resumable(path: Path, params: Params, data_dir: Path) -> dict | None:
    """The checkpoint to resume from, if one exists for these params and data; None means a fresh start."""
    return Checkpointer.for_run(path, params, data_dir).resumable()
