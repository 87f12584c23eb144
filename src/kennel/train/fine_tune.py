"""train(params, data_dir): data placement, model, optimizer, schedule, checkpoints and the fit loop, from params."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import kennel
from kennel.core.device import amp_name, resolve_amp, resolve_device
from kennel.core.params import Params
from kennel.data.augment import Augment
from kennel.data.dataset import ImageArrayDataset
from kennel.data.shards import read_meta, read_split
from kennel.train.batches import Batches, BatchSampler
from kennel.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kennel.train.distributed import Dist
from kennel.train.loop import EpochResult, FitState, Step, fit, predict
from kennel.train.model import Classifier, WeightsInfo, build_model
from kennel.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# Share of free device memory (or available RAM) the uint8 train + val splits may take to be held resident.
RESIDENT_FRACTION = 0.25
# Params that change how fast, not what, a run trains (or only where it is recorded): a checkpoint stays valid.
NOT_IN_FINGERPRINT = {"train.num_workers", "train.compile", "data.workers", "resize.workers", "evaluate.tta"}


@dataclass
class TrainResult:
    model: Classifier
    history: list[EpochResult]
    weights: WeightsInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    data_placement: str = ""  # "device" (resident) or "stream" (DataLoader from the memory map)
    resumed_from: int = 0  # epoch of the checkpoint resumed, 0 for a fresh start
    selected_epoch: int = 0  # the epoch whose weights the model holds


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


def fingerprint(params: Params, data_dir: Path) -> str:
    """Hash of everything that decides the result of training: params (less speed knobs), data and code."""
    relevant = {k: v for k, v in params.flat().items()
                if k not in NOT_IN_FINGERPRINT and not k.startswith("mlflow.")}
    data = read_meta(data_dir).get("fingerprint", "")
    return hashlib.sha256(json.dumps([relevant, data, code_fingerprint()], sort_keys=True, default=str).encode()
                          ).hexdigest()


def code_fingerprint() -> str:
    """Hash of the kennel package's source: a fixed bug must not be resumed into an old run's weights."""
    package = Path(kennel.__file__).parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def make_loader(
    dataset: ImageArrayDataset, batch_size: int, num_workers: int, device: torch.device, shuffle: bool = False,
    generator: torch.Generator | None = None, rank: int = 0, world: int = 1,
) -> DataLoader:
    """Batches streamed from the memory map: pinned memory and non-blocking copies on CUDA."""
    sampler = BatchSampler(len(dataset), batch_size, shuffle, generator, rank, world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0)


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


def _batches(data_dir: Path, split: str, resident: bool, batch_size: int, device: torch.device, t, ctx: Dist,
             shuffle: bool, generator: torch.Generator | None) -> Iterable:
    rank, world = (ctx.rank, ctx.world) if shuffle else (0, 1)  # every rank evaluates the whole split
    if resident:
        images, labels = read_split(data_dir, split)
        x = torch.from_numpy(np.array(images)).to(device)  # a real copy in RAM or on the GPU, not the map
        return Batches(x, torch.from_numpy(labels), batch_size, shuffle, generator, rank, world)
    return make_loader(ImageArrayDataset(data_dir, split), batch_size, t.num_workers, device, shuffle, generator,
                       rank, world)


def extract_features(model: Classifier, batches: Iterable, device: torch.device,
                     amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (the head's input) for every image, computed once."""
    with model.without_head():
        return predict(model, batches, device, amp_dtype)


@dataclass(frozen=True)
class Phase:
    """Epochs ``first..last`` trained with one optimizer and one schedule; frozen = head only, on cached features."""

    index: int
    first: int
    last: int
    frozen: bool


def phases(params: Params) -> list[Phase]:
    """``head``: one frozen phase; ``full``: one phase of all layers; ``staged`` (fastai's fine_tune):
    ``train.head_epochs`` frozen, then all layers with the schedule restarting."""
    t, finetune = params.train, params.model.finetune
    if finetune == "staged":
        return [Phase(1, 1, t.head_epochs, True), Phase(2, t.head_epochs + 1, t.epochs, False)]
    return [Phase(1, 1, t.epochs, finetune == "head")]


def param_groups(model: Classifier, lr: float, backbone_lr_mult: float) -> list[dict]:
    """Discriminative learning rates: the head at ``lr`` (first group, the one logged), the backbone slower."""
    head = model.head_parameter_names()
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n in head], "lr": lr},
            {"params": [p for n, p in named if n not in head], "lr": lr * backbone_lr_mult}]


def _model_state(model: Classifier, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A best state kept in a frozen phase (the head's keys only) as the whole model's: the backbone did not move."""
    if state is None or any(k.startswith("backbone.") for k in state):
        return state
    prefix = f"backbone.{model.head_name}."
    return {**{k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
            **{prefix + k: v for k, v in state.items()}}


def build_for(params: Params, data_dir: Path, device: torch.device) -> tuple[Classifier, WeightsInfo]:
    """``params``' model for ``data_dir``'s classes, on ``device`` in channels_last; seed the RNG first."""
    model, weights = build_model(params.model.arch, read_meta(data_dir)["classes"], params.model.weights,
                                 params.model.finetune)
    return model.to(device, memory_format=torch.channels_last), weights


def train(
    params: Params,
    data_dir: Path,
    on_epoch: Callable[[EpochResult], None] = lambda r: None,
    on_start: Callable[[TrainResult], None] = lambda r: None,
    checkpoint: Path | None = None,
    resume: dict | None = None,
    checkpoint_extra: dict | None = None,
    ctx: Dist | None = None,
) -> TrainResult:
    """Fine-tune per ``params`` on ``data_dir``'s train split, validating on val after every epoch.

    With ``checkpoint``, the state after every epoch is saved there (by rank 0); ``resume`` (a payload from
    ``find_resumable``) continues such a run, in either phase of ``staged``, so that it ends exactly where an
    uninterrupted one would. ``on_start`` sees the built model, device and placement before the first epoch.
    """
    t, ctx = params.train, ctx or Dist()
    device = resolve_device(t.device)
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", ctx.local_rank)
    set_determinism(t.deterministic)
    amp_dtype = resolve_amp(t.amp, device)
    generator = seed_everything(params.seed)
    model, weights = build_for(params, data_dir, device)

    train_images, _ = read_split(data_dir, "train")
    val_images, _ = read_split(data_dir, "val")
    if len(train_images) == 0:
        raise ValueError(f"{data_dir}: the train split is empty")
    resident = fits_resident(train_images.nbytes + val_images.nbytes, device, t.data_on_device)
    batch_size = t.batch_size // ctx.world

    state, start = FitState(), 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        set_rng_state(resume["rng"], generator)
        state = FitState([EpochResult(**r) for r in resume["history"]], resume["best_epoch"],
                         tuple(resume["best_score"]), resume["best_state"])
        start = resume["epoch"] + 1
    result = TrainResult(model, state.history, weights, device, amp_dtype, "device" if resident else "stream",
                         resumed_from=start - 1)
    log.info(
        "training on %s (amp %s, data %s), %d train / %d val images, batch %d x %d processes, weights %s%s",
        device, amp_name(amp_dtype), result.data_placement, len(train_images), len(val_images), batch_size,
        ctx.world, weights.source, f", resuming after epoch {start - 1}" if start > 1 else "",
    )
    on_start(result)
    fp = fingerprint(params, data_dir) if checkpoint is not None else ""
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

    module: nn.Module = model
    for phase in phases(params):
        if phase.last < start:
            continue  # finished before the checkpoint we resume from
        model.set_frozen(phase.frozen)
        if phase.frozen:
            # The backbone is frozen, so its features never change: compute them once and train the head on them.
            log.info("epochs %d-%d: head only, on backbone features computed once (no augmentation)",
                     phase.first, phase.last)
            unshuffled = [_batches(data_dir, split, resident, batch_size, device, t, Dist(), False, None)
                          for split in ("train", "val")]
            (ftrain, ytrain), (fval, yval) = [
                (f.to(device), y) for f, y in (extract_features(model, b, device, amp_dtype) for b in unshuffled)]
            train_batches: Iterable = Batches(ftrain, ytrain, batch_size, True, generator, ctx.rank, ctx.world)
            val_batches: Iterable = Batches(fval, yval, batch_size)
            module, groups, augment = model.head, list(model.head.parameters()), None
        else:
            if phase.index > 1:
                state.best_state = _model_state(model, state.best_state)
                log.info("epochs %d-%d: all layers, backbone lr x %g", phase.first, phase.last, t.backbone_lr_mult)
            train_batches = _batches(data_dir, "train", resident, batch_size, device, t, ctx, True, generator)
            val_batches = _batches(data_dir, "val", resident, batch_size, device, t, ctx, False, None)
            module = model
            groups = param_groups(model, t.lr, t.backbone_lr_mult) if phase.index > 1 else list(model.parameters())
            a = t.augment
            augment = Augment(a.flip, (a.scale_min, a.scale_max), (a.ratio_min, a.ratio_max)) \
                if a.enabled else None

        trained = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None) \
            if ctx.world > 1 else module
        if t.compile:
            trained = torch.compile(trained)
        optimizer = build_optimizer(t.optimizer, groups, t.lr, t.momentum, t.weight_decay, t.nesterov)
        scheduler = build_scheduler(t.schedule, optimizer, phase.last - phase.first + 1, len(train_batches),
                                    t.warmup_epochs)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        if resume is not None and phase.first <= resume["epoch"] < phase.last:
            optimizer.load_state_dict(resume["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(resume["scheduler"])
            if scaler is not None and resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])

        def after_epoch(epoch_result: EpochResult, fit_state: FitState, phase=phase, optimizer=optimizer,
                        scheduler=scheduler, scaler=scaler) -> None:
            # Report first, then checkpoint: a kill in between repeats this epoch on resume (same numbers, logged
            # twice) rather than skipping its report.
            on_epoch(epoch_result)
            if checkpoint is not None and ctx.is_main:
                save_checkpoint(checkpoint, {
                    "fingerprint": fp, "epoch": epoch_result.epoch, "phase": phase.index,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler else None,
                    "scaler": scaler.state_dict() if scaler else None, "rng": rng_state(generator),
                    "history": [asdict(r) for r in fit_state.history], "best_epoch": fit_state.best_epoch,
                    "best_score": list(fit_state.best_score), "best_state": fit_state.best_state,
                    **(checkpoint_extra or {}),
                })

        step = Step(amp_dtype, scaler, scheduler, criterion, t.grad_clip, augment, generator)
        state = fit(trained, train_batches, val_batches, optimizer, phase.last, device, step, eval_model=module,
                    state=state, start_epoch=max(start, phase.first), on_epoch=after_epoch)

    model.set_frozen(False)
    result.history = state.history
    result.selected_epoch = state.history[-1].epoch
    if t.select == "best" and state.best_state is not None:
        module.load_state_dict(state.best_state)
        result.selected_epoch = state.best_epoch
    log.info("kept the weights of epoch %d of %d (train.select: %s)", result.selected_epoch, t.epochs, t.select)
    return result


def find_resumable(path: Path, params: Params, data_dir: Path) -> dict | None:
    """The checkpoint to resume from, if one exists for these params and data; None means a fresh start."""
    return load_checkpoint(path, fingerprint(params, data_dir))
