"""The training step never waits for the device: totals stay there and are read once per epoch.

On a GPU every read of a device value into Python (``.item()``, ``.tolist()``, ``float(t)``, an f-string) stops
the host from queueing the next step. On the CPU the same reads are counted with a torch function mode: their
number must not grow with the number of steps.
"""

import io
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from kennel.train import loop
from kennel.train.augment import Augment
from kennel.train.batches import Batches
from kennel.train.loop import PROGRESS_EVERY, StepConfig, train_one_epoch
from kennel.train.optim import build_scheduler
from tests.conftest import blocking

READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__"}


class CountReads(TorchFunctionMode):
    """Counts the calls that bring a tensor's value to the host (nested calls inside them are not seen)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += getattr(func, "__name__", "") in READS
        return func(*args, **(kwargs or {}))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2)).to(memory_format=torch.channels_last)


def _data(n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=g)
    return x.to(device), torch.randint(0, 2, (n,), generator=g).to(device)


def _epoch(model: nn.Module, n: int, batch_size: int = 4, device: str = "cpu", amp=None) -> tuple[float, float, int]:
    """One epoch with every per-step feature on: shuffling, augmentation, a per-step schedule, clipping."""
    # SGD: Adam reads its step count with .item() every step, but from a CPU tensor, which never waits for a GPU
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    x, y = _data(n, device)
    batches = Batches(x, y, batch_size, shuffle=True, generator=gen)
    step = StepConfig(amp, scheduler=build_scheduler("cosine", opt, 1, len(batches), 0.5), grad_clip=1.0,
                augment=Augment(vflip=0.5, rot90=True), generator=gen)
    return train_one_epoch(model, batches, opt, torch.device(device), step)


def _reads(steps: int) -> int:
    model = _net()
    with CountReads() as counter:
        _epoch(model, 4 * steps)
    return counter.reads


def test_reads_per_epoch_do_not_grow_with_steps():
    few, many = _reads(3), _reads(3 * PROGRESS_EVERY)
    assert few == many <= 2, (few, many)


@pytest.fixture
def shown_bars(monkeypatch) -> list:
    """Progress bars drawn as on a terminal (pytest's output is not one, so tqdm would switch them off)."""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bars = []

    def bar(iterable, **kwargs):
        bars.append(tqdm(iterable, **{**kwargs, "disable": False, "file": Terminal()}))
        return bars[-1]

    monkeypatch.setattr(loop, "tqdm", bar)
    return bars


def test_the_progress_bar_reads_once_per_refresh(shown_bars):
    steps = 3 * PROGRESS_EVERY + 1
    model = _net()
    with CountReads() as counter:
        _epoch(model, 4 * steps)
    assert counter.reads <= 2 + steps // PROGRESS_EVERY, counter.reads
    assert {"loss", "acc", "img_s"} <= set(shown_bars[0].postfix.replace(" ", "").replace("=", ",").split(","))


def test_epoch_totals_equal_a_recomputation_from_each_step():
    """The device-side totals are the per-step loss x batch size and correct counts, summed in float64."""
    recorded = []

    class Recording(nn.CrossEntropyLoss):
        def forward(self, logits, labels):
            loss = super().forward(logits, labels)
            recorded.append((loss.item(), (logits.argmax(1) == labels).sum().item(), labels.numel()))
            return loss

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    x, y = _data(23)  # batches of 5, 5, 5, 5, 3: the mean must weight the short batch by its size
    loss, acc, seen = train_one_epoch(model, Batches(x, y, 5, True, gen), opt, torch.device("cpu"),
                                      StepConfig(criterion=Recording(), augment=Augment(), generator=gen))
    assert [n for *_, n in recorded] == [5, 5, 5, 5, 3] and seen == 23
    loss_sum = 0.0
    for step_loss, _, n in recorded:
        loss_sum += step_loss * n
    assert loss == loss_sum / 23  # exact: the same float64 operations in the same order
    assert acc == sum(c for _, c, _ in recorded) / 23


BLOCK = blocking("mlflow", "dvc") + """
import kennel.data, kennel.data.dataset, kennel.data.shards, kennel.train.loop, kennel.train.fine_tune
assert not {"mlflow", "dvc"} & {m.split(".")[0] for m in sys.modules}
print("ok")
"""


def test_training_imports_without_mlflow_and_dvc():
    """The GPU machine runs the engine with only torch and the data stack installed."""
    out = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_epoch_synchronises_a_fixed_number_of_times(shown_bars):
    """torch's sync debug mode warns at every operation that makes the host wait for the GPU; the bar is on."""
    model = _net().cuda()

    def syncs(steps: int) -> list[str]:
        """Where the epoch's waits come from: the files whose lines made them."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _epoch(model, 4 * steps, device="cuda", amp=torch.bfloat16)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [w.filename for w in caught if "synchroniz" in str(w.message)]

    # warm-up: cuDNN's algorithm search syncs, and so does the first switch into the debug mode itself
    syncs(3)
    few, many = syncs(3), syncs(3 * PROGRESS_EVERY + 1)
    assert len(few) == len(many), (few, many)
    # the test's own pageable copies of its data wait too; training itself waits once, for the epoch's totals
    kennel_src = Path(loop.__file__).parents[1]
    assert [f for f in many if Path(f).is_relative_to(kennel_src)] == [loop.__file__], many
