"""train_one_epoch / evaluate / fit, batching and on-device augmentation.

Knows nothing of MLflow or files: progress goes out through callbacks, so the same loop serves the train stage,
the tests and the benchmarks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    images_per_second: float

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "epoch"}


@dataclass
class FitState:
    """What fit carries from epoch to epoch, and what a checkpoint must hold to resume it."""

    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    best_score: tuple[float, float] = (-math.inf, -math.inf)  # (val accuracy, -val loss): higher is better
    best_state: dict[str, torch.Tensor] | None = None

    def consider(self, result: EpochResult, model: nn.Module) -> None:
        score = (result.val_accuracy, -result.val_loss)
        if not math.isnan(result.val_accuracy) and score > self.best_score:
            self.best_epoch, self.best_score = result.epoch, score
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is not there is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise RuntimeError(f"train.device = {name!r}, but no {name} device is available here: use auto or cpu")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``train.amp``; ``auto`` uses bf16 only where the hardware runs it natively."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16  # ~2x faster than fp32 on AVX512-BF16/AMX; slower than fp32 elsewhere
    return None


def amp_name(dtype: torch.dtype | None) -> str:
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    # uint8 crosses to the device (4x less than float); channels_last suits convolutions on CPU and GPU.
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if images.ndim == 4 else images


def _send(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without stalling the host.

    A copy from pageable memory waits for the GPU to finish all queued work; from pinned memory with
    ``non_blocking`` it is queued like a kernel. The pinned block is not reused before its copy has run (torch's
    pinned-memory cache records the copy), so building a fresh one per call is safe.
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------- batches


def batch_order(
    n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None, rank: int = 0, world: int = 1
) -> list[torch.Tensor]:
    """Index batches for one epoch: one permutation from ``generator``, this rank's equal share of it.

    Every rank draws the same permutation from an identically seeded generator and takes every world-th index;
    the order is cut to a multiple of ``world`` so that all ranks run the same number of steps. A lone last
    sample is dropped when shuffling (BatchNorm cannot train on a batch of one).
    """
    return list(epoch_order(n, batch_size, shuffle, generator, rank, world).split(batch_size))


def epoch_order(
    n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """``batch_order`` before it is cut into batches: this rank's indices for one epoch, in order."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order[: n - n % world][rank::world]
    if shuffle and len(order) > 1 and len(order) % batch_size == 1:
        order = order[:-1]
    return order


class BatchSampler:
    """``batch_order`` as a DataLoader batch sampler, for data that streams from disk."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, generator=None, rank: int = 0, world: int = 1):
        self.args = (n, batch_size, shuffle, generator, rank, world)

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in batch_order(*self.args))

    def __len__(self) -> int:
        n, batch_size, shuffle, _, _, world = self.args
        per_rank = (n - n % world) // world
        per_rank -= shuffle and per_rank > 1 and per_rank % batch_size == 1
        return math.ceil(per_rank / batch_size)


class Batches:
    """Mini-batches drawn from tensors already where they are used (GPU memory, or RAM for the CPU).

    airbench-style: no DataLoader, no per-sample Python, no copies; a batch is one index into the tensor.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, rank: int = 0, world: int = 1):
        self.images, self.labels = images, labels.to(images.device)
        self.sampler = BatchSampler(len(labels), batch_size, shuffle, generator, rank, world)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The epoch's whole order crosses to the device in one copy, not one blocking copy per batch.
        order = _send(epoch_order(*self.sampler.args), self.images.device)
        for idx in order.split(self.sampler.args[1]):
            yield self.images[idx], self.labels[idx]


# ---------------------------------------------------------------------------------------------------- augment


@dataclass(frozen=True)
class Augment:
    """Per-sample random resized crop + horizontal flip for a whole batch with one ``grid_sample``.

    Parameters are drawn on the CPU from ``generator`` (so a run is repeatable and resumable on any device, and
    draws the same crops on each); they reach the device without a blocking copy, and the sampling runs wherever
    the images are.
    """

    flip: float = 0.5
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
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
        theta = _send(theta, images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return out.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------- loops


# Steps between refreshes of the progress bar's running loss and accuracy.
PROGRESS_EVERY = 10


@dataclass(frozen=True)
class Step:
    """How one optimisation step runs, beyond the model, optimizer and device."""

    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped every batch
    criterion: nn.Module | None = None  # default: cross-entropy
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    augment: Augment | None = None
    generator: torch.Generator | None = None  # draws the augmentation


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    step: Step = Step(),
    desc: str = "train",
) -> tuple[float, float, int]:
    """One pass: zero_grad -> forward -> loss -> backward -> step. Returns (mean loss, accuracy, images).

    Nothing in the loop waits for the device: the totals stay there and are read once, at the end, so the host
    queues the next step while the GPU runs this one (fp16's GradScaler still checks for overflow every step).
    """
    model.train()
    amp_dtype, scaler, grad_clip = step.amp_dtype, step.scaler, step.grad_clip
    criterion = step.criterion or nn.CrossEntropyLoss()
    total = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    loss_sum = torch.zeros((), dtype=total, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0  # batch sizes are known on the host
    start = time.perf_counter()
    bar = tqdm(batches, desc=desc, leave=False, unit="batch", disable=None)
    progress = _Progress(bar, device)
    for i, (images, labels) in enumerate(bar, 1):
        images, labels = _to_device(images, device), labels.to(device, non_blocking=True)
        if step.augment is not None:
            images = step.augment(images, step.generator)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = criterion(logits.float(), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if step.scheduler is not None:
            step.scheduler.step()
        n = labels.numel()
        loss_sum += loss.detach().to(total) * n
        correct += (logits.argmax(1) == labels).sum()
        seen += n
        if i % PROGRESS_EVERY == 0:
            progress.update(loss_sum, correct, seen, time.perf_counter() - start)
    totals = torch.stack((loss_sum, correct.to(total), loss_sum.new_full((), seen)))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)  # every rank reports the whole epoch, not its shard
    loss_sum, correct, seen = totals.tolist()  # the epoch's one wait for the device
    return loss_sum / max(seen, 1), correct / max(seen, 1), int(seen)


class _Progress:
    """Running loss / accuracy / img/s on the bar, read from a non-blocking copy of the device totals.

    On CUDA the copy goes into pinned memory behind the queued steps and is shown at a later refresh, once its
    event has passed, so the bar never makes the host wait; elsewhere it is read at once.
    """

    def __init__(self, bar: tqdm, device: torch.device):
        self.bar, self.device = bar, device
        self.pending: tuple[torch.Tensor, torch.cuda.Event, int, float] | None = None

    def update(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, seconds: float) -> None:
        if self.bar.disable:
            return
        totals = torch.stack((loss_sum, correct.to(loss_sum.dtype)))
        if self.device.type != "cuda":
            self._show(totals.tolist(), seen, seconds)
            return
        if self.pending is not None and self.pending[1].query():
            host, _, n, secs = self.pending
            self._show(host.tolist(), n, secs)
            self.pending = None
        if self.pending is None:
            host = torch.empty(totals.shape, dtype=totals.dtype, pin_memory=True)
            host.copy_(totals, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (host, event, seen, seconds)

    def _show(self, totals: list[float], seen: int, seconds: float) -> None:
        loss_sum, correct = totals
        self.bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                             img_s=f"{seen / max(seconds, 1e-9):.0f}", refresh=False)


@torch.inference_mode()
def predict(
    model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs as float32 on the CPU, labels) over all batches."""
    model.eval()
    outputs, all_labels = [], []
    for images, labels in batches:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(_to_device(images, device))
        outputs.append(out.float())  # gathered where computed: one copy to the CPU at the end, not one per batch
        all_labels.append(torch.as_tensor(labels))
    if not outputs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outputs).cpu(), torch.cat(all_labels).cpu()


def evaluate(
    model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy); NaN for both when there is nothing to evaluate."""
    logits, labels = predict(model, batches, device, amp_dtype)
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def fit(
    model: nn.Module,
    train_batches: Iterable,
    val_batches: Iterable,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    step: Step = Step(),
    *,
    eval_model: nn.Module | None = None,
    state: FitState | None = None,
    start_epoch: int = 1,
    on_epoch: Callable[[EpochResult, FitState], None] = lambda result, state: None,
) -> FitState:
    """Train epochs ``start_epoch..epochs``, evaluating ``eval_model`` (default ``model``) after each.

    ``on_epoch`` sees every result with the state (to log, and to checkpoint: a resumed fit continues from the
    ``state`` and ``start_epoch`` a checkpoint gives back).
    """
    state = state or FitState()
    eval_model = eval_model or model
    for epoch in range(start_epoch, epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc, seen = train_one_epoch(
            model, train_batches, optimizer, device, step, desc=f"epoch {epoch}/{epochs}"
        )
        train_seconds = time.perf_counter() - start
        val_loss, val_acc = evaluate(eval_model, val_batches, device, step.amp_dtype)
        result = EpochResult(
            epoch, train_loss, train_acc, val_loss, val_acc, lr,
            seconds=time.perf_counter() - start, images_per_second=seen / max(train_seconds, 1e-9),
        )
        log.info(
            "epoch %d/%d  train loss %.4f acc %.3f  val loss %.4f acc %.3f  lr %.2e  %.1f img/s  %.1fs",
            epoch, epochs, train_loss, train_acc, val_loss, val_acc, lr, result.images_per_second, result.seconds,
        )
        state.history.append(result)
        state.consider(result, eval_model)
        on_epoch(result, state)
    return state


# ---------------------------------------------------------------------------------------------------- builders


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
