"""train_one_epoch / evaluate / fit.

Knows nothing of MLflow or files: progress goes out through callbacks, so the same loop serves the train stage,
the tests and the benchmarks."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from kennel.core.device import to_device
from kennel.train.augment import Augment, Mix
from kennel.train.probe import Probe

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
        """What the run logs for the epoch: val's numbers left out when it validated on nothing."""
        return {k: v for k, v in asdict(self).items() if k != "epoch" and not (k.startswith("val_") and math.isnan(v))}


@dataclass
class FitState:
    """What fit carries from epoch to epoch, and what a checkpoint must hold to resume it."""

    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    # (-val loss, val accuracy): higher is better. The loss is the proper score: on a val split of a hundred
    # images accuracy moves in steps of 1 % and ties across most epochs (and across phases), while the
    # cross-entropy still tells a confident right answer from a lucky one.
    best_score: tuple[float, float] = (-math.inf, -math.inf)
    best_state: dict[str, torch.Tensor] | None = None
    probe: Probe | None = None  # the frozen phase's linear probe, kept across a resume
    start_state: dict[str, torch.Tensor] | None = None  # staged: the weights the all-layer phase started from
    stopped_after: int = 0  # the epoch after which train.patience stopped the phase (0: it ran to its end)
    members: list[dict[str, torch.Tensor]] = field(default_factory=list)  # train.ensemble: the finished members

    def consider(self, result: EpochResult, model: nn.Module) -> None:
        score = (-result.val_loss, result.val_accuracy)
        if not math.isnan(result.val_loss) and score > self.best_score:
            self.best_epoch, self.best_score = result.epoch, score
            self.best_state = snapshot(model)

    def stale(self, patience: int, since: int = 0) -> bool:
        """Early stopping (``train.patience``): the last ``patience`` epochs after epoch ``since`` (where the phase
        began) did not improve on the best val loss. Read from the history, so a run resumed from a checkpoint
        decides as the uninterrupted one did."""
        # an epoch with nothing to validate on (train.refit members) judges nothing
        if patience <= 0 or not self.history or self.best_epoch == 0 or math.isnan(self.history[-1].val_loss):
            return False
        return self.history[-1].epoch - max(self.best_epoch, since) >= patience



def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights and buffers copied to the CPU: kept as they are while training goes on."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# Steps between refreshes of the progress bar's running loss and accuracy.
PROGRESS_EVERY = 10


@dataclass(frozen=True)
class StepConfig:
    """How one optimisation step runs, beyond the model, optimizer and device."""

    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped every batch
    criterion: nn.Module | None = None  # default: cross-entropy
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    augment: Augment | None = None
    generator: torch.Generator | None = None  # draws the augmentation
    mix: Mix | None = None  # mixup / cutmix: the loss then takes each image's class shares


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    step: StepConfig = StepConfig(),
    desc: str = "train",
    progress: bool = True,
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
    bar = tqdm(batches, desc=desc, leave=False, unit="batch", disable=None if progress and first_process() else True)
    progress = _Progress(bar, device)
    for i, (images, labels) in enumerate(bar, 1):
        images, labels = to_device(images, device), labels.to(device, non_blocking=True)
        if step.augment is not None:
            images = step.augment(images, step.generator)
        targets = labels
        if step.mix is not None:  # train accuracy stays against each image's own label
            images, targets = step.mix(images, labels)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = criterion(logits.float(), targets)
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


def first_process() -> bool:
    """Progress bars are drawn by one process only: the first under DDP. (Where stderr is no terminal, as in the
    log of a queued experiment, tqdm draws none at all.)"""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@torch.inference_mode()
def predict(
    model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
    desc: str = "predict",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs as float32 on the CPU, labels) over all batches."""
    model.eval()
    outputs, all_labels = [], []
    bar = tqdm(batches, desc=desc, leave=False, unit="batch", disable=None if first_process() else True)
    for images, labels in bar:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(to_device(images, device))
        outputs.append(out.float())  # gathered where computed: one copy to the CPU at the end, not one per batch
        all_labels.append(torch.as_tensor(labels))
    if not outputs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outputs).cpu(), torch.cat(all_labels).cpu()


def evaluate(
    model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy); NaN for both when there is nothing to evaluate. Under DDP each process
    evaluates its share of the split and the sums are added up, so every process gets the whole split's numbers."""
    logits, labels = predict(model, batches, device, amp_dtype, desc="validate")
    if dist.is_available() and dist.is_initialized():
        sums = torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0,
                             float((logits.argmax(1) == labels).sum()) if len(labels) else 0.0, float(len(labels))],
                            dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(sums)
        loss_sum, correct, n = sums.tolist()
        return (loss_sum / n, correct / n) if n else (float("nan"), float("nan"))
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
    step: StepConfig = StepConfig(),
    *,
    eval_model: nn.Module | None = None,
    state: FitState | None = None,
    start_epoch: int = 1,
    on_epoch: Callable[[EpochResult, FitState], None] = lambda result, state: None,
    patience: int = 0,
    since: int = 0,
) -> FitState:
    """Train epochs ``start_epoch..epochs``, evaluating ``eval_model`` (default ``model``) after each; with
    ``patience``, stop once that many epochs in a row after epoch ``since`` did not improve on the best val loss.

    ``on_epoch`` sees every result with the state (to log, and to checkpoint: a resumed fit continues from the
    ``state`` and ``start_epoch`` a checkpoint gives back).
    """
    state = state or FitState()
    eval_model = eval_model or model
    for epoch in range(start_epoch, epochs + 1):
        if state.stale(patience, since):
            state.stopped_after = state.history[-1].epoch
            log.info("stopping early: val loss has not improved for %d epochs (best: epoch %d)", patience,
                     state.best_epoch)
            break
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
            "epoch %d/%d  train loss %.4f acc %.3f  %s  lr %.2e  %.1f img/s  %.1fs", epoch, epochs, train_loss,
            train_acc, "no val" if math.isnan(val_loss) else f"val loss {val_loss:.4f} acc {val_acc:.3f}", lr,
            result.images_per_second, result.seconds,
        )
        state.history.append(result)
        state.consider(result, eval_model)
        on_epoch(result, state)
    return state
