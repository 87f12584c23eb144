"""Training throughput: a torchvision-reference-style baseline vs kennel's engine vs the model alone, in one run.

    python benchmarks/train.py [--device cpu|cuda] [--images 256] [--batch-size 32] [--steps 4] [--compile both]

On the same generated JPEGs, model (resnet18, 2 classes), batch size and image size:
  (a) baseline  ImageFolder over the JPEGs + RandomResizedCrop/RandomHorizontalFlip/ToTensor/Normalize, DataLoader
                workers, fp32 loop, a plain torchvision resnet18
  (b) kennel    kennel.engine.train_one_epoch on the resized uint8 arrays held on the device, per-sample
                augmentation on the device, amp auto, channels_last
  (c) ceiling   the same model, amp and memory format as (b) on random uint8 tensors already on the device
and, for fine-tuning the head only, one epoch on cached backbone features vs one full fine-tuning epoch.
``--compile both`` measures (b) and (c) eager and under torch.compile in the same run, on the same arrays.
Prints one table (progress and timings of each part go to stderr). Needs torch, torchvision, numpy, pandas,
pillow and tqdm; installs nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from hostinfo import cpu_name
from PIL import Image
from torch import nn
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from plain_arrays import read_plain, write_split  # noqa: E402

from kennel.core.device import amp_name, resolve_amp  # noqa: E402
from kennel.data.images import load_array  # noqa: E402
from kennel.data.parallel import pmap, resolve_workers  # noqa: E402
from kennel.model.network import IMAGENET_MEAN, IMAGENET_STD, build_model  # noqa: E402
from kennel.train.augment import Augment  # noqa: E402
from kennel.train.batches import Batches  # noqa: E402
from kennel.train.fine_tune import extract_features  # noqa: E402
from kennel.train.loop import StepConfig, train_one_epoch  # noqa: E402


def _make_jpeg(item: tuple[int, str]) -> None:
    i, root = item
    rng = np.random.default_rng(i)
    w, h = rng.integers(300, 501, size=2)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(w, h)
    img = np.stack([x * 200 + 30, y * 180 + 40, (x + y) * 90 + 20], axis=-1)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    folder = Path(root) / ("cat", "dog")[i % 2]
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=88)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def baseline(jpegs: Path, args, device: torch.device) -> float:
    """(a) images/s of the loop a user copies from the torchvision references."""
    tf = transforms.Compose([
        transforms.RandomResizedCrop(args.size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    data = torchvision.datasets.ImageFolder(str(jpegs), transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True, persistent_workers=True)
    model = torchvision.models.resnet18(num_classes=2).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def steps(n):
        it = iter(loader)
        for _ in range(n):
            images, labels = next(it)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()

    steps(args.warmup)
    return args.steps * args.batch_size / _timed(lambda: steps(args.steps), device)


def kennel(x: torch.Tensor, y: torch.Tensor, args, device: torch.device, amp, compile: bool) -> tuple[float, float]:
    """(b) images/s of kennel's engine, and the seconds of one full epoch over all images."""
    model = build_model("resnet18", ["cat", "dog"])[0].to(device, memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    aug = Augment()
    n = args.steps * args.batch_size

    def epoch(images, labels):
        batches = Batches(images, labels, args.batch_size, shuffle=True, generator=gen)
        train_one_epoch(model, batches, opt, device, StepConfig(amp, augment=aug, generator=gen))

    epoch(x[: args.warmup * args.batch_size], y[: args.warmup * args.batch_size])
    rate = n / _timed(lambda: epoch(x[:n], y[:n]), device)
    return rate, _timed(lambda: epoch(x, y), device)


def ceiling(args, device: torch.device, amp, compile: bool) -> float:
    """(c) images/s of the model alone: forward, backward and step on tensors already on the device."""
    model = build_model("resnet18", ["cat", "dog"])[0].to(device, memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (args.batch_size,), device=device)
    model.train()

    def steps(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = nn.functional.cross_entropy(model(images).float(), labels)
            loss.backward()
            opt.step()

    steps(args.warmup)
    return args.steps * args.batch_size / _timed(lambda: steps(args.steps), device)


def head_epoch(x: torch.Tensor, y: torch.Tensor, args, device: torch.device, amp) -> tuple[float, float]:
    """(seconds to cache the backbone features once, seconds of one head-only epoch on them)."""
    model = build_model("resnet18", ["cat", "dog"])[0].to(device, memory_format=torch.channels_last)
    model.set_frozen(True)  # head only
    out = {}
    cache = _timed(lambda: out.update(f=extract_features(model, Batches(x, y, args.batch_size), device, amp)),
                   device)
    features, labels = out["f"]
    features = features.to(device)
    fc = model.backbone.fc
    opt = torch.optim.SGD(fc.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)

    def epoch():
        train_one_epoch(fc, Batches(features, labels, args.batch_size, True, gen), opt, device, StepConfig(amp))

    epoch()  # warm-up
    return cache, _timed(epoch, device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_name()}, {resolve_workers('auto')} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each measurement")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=resolve_workers("auto"), help="baseline DataLoader workers")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off",
                        help="torch.compile the model in (b) and (c): off, on, or both side by side")
    args = parser.parse_args()
    if args.images < (args.warmup + args.steps) * args.batch_size:
        parser.error("--images must cover (warmup + steps) x batch-size")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    amp = resolve_amp("auto", device)
    torch.manual_seed(0)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    b, c, full_epoch = {}, {}, {}

    with tempfile.TemporaryDirectory(prefix="kennel-train-bench-") as tmp:
        jpegs = Path(tmp) / "jpegs"
        for label in ("cat", "dog"):
            (jpegs / label).mkdir(parents=True)
        start = time.perf_counter()
        for _ in pmap(_make_jpeg, [(i, str(jpegs)) for i in range(args.images)], "auto", desc="generate"):
            pass
        paths = sorted(jpegs.glob("*/*.jpg"))
        labels = [0 if p.parent.name == "cat" else 1 for p in paths]
        write_split(Path(tmp), "train", paths, labels, args.size, partial(load_array, mode="center_crop"), "auto")
        images, ys = read_plain(Path(tmp), "train")
        x, y = torch.from_numpy(np.array(images)).to(device), torch.from_numpy(ys).to(device)
        _say(f"{args.images} JPEGs generated and resized in {time.perf_counter() - start:.1f} s")

        a = _part("(a) baseline", baseline, jpegs, args, device)
        b32 = None
        for m in modes:  # eager first: if compiling runs out of time, the eager numbers are already on stderr
            name = "compiled" if m else "eager"
            b[m], full_epoch[m] = _part(f"(b) {name}", kennel, x, y, args, device, amp, m)
            c[m] = _part(f"(c) {name}", ceiling, args, device, amp, m)
            if not m:
                b32 = b[m] if amp is None else _part("(b) eager, amp off", kennel, x, y, args, device, None, m)[0]
                cache_s, head_s = _part("head-only epoch", head_epoch, x, y, args, device, amp)

    print(f"machine: {machine(device)}")
    print(f"resnet18, {args.size}x{args.size}, batch {args.batch_size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up; kennel amp {amp_name(amp)}; baseline fp32 with {args.workers} DataLoader workers\n")
    cols = ["compiled" if m else ("eager" if len(modes) > 1 else "value") for m in modes]
    print("| measurement | " + " | ".join(cols) + " |")
    print("|---" * (1 + len(cols)) + "|")

    def row(name: str, values) -> None:
        print(f"| {name} | " + " | ".join(values) + " |")

    row("(a) baseline: ImageFolder JPEGs + DataLoader, fp32", [f"{a:.1f} img/s"] * len(modes))
    row("(b) kennel engine: resident uint8 + on-device augmentation", [f"{b[m]:.1f} img/s" for m in modes])
    if b32 is not None:
        row("(b) with amp off (fp32, like the baseline)", [f"{b32:.1f} img/s" if not m else "-" for m in modes])
    row("(c) ceiling: model alone on device tensors", [f"{c[m]:.1f} img/s" for m in modes])
    row("b/a", [f"{b[m] / a:.2f}x" for m in modes])
    if b32 is not None:
        row("b/a with amp off on both", [f"{b32 / a:.2f}x" if not m else "-" for m in modes])
    row("b/c", [f"{b[m] / c[m]:.2f}" for m in modes])
    row(f"full fine-tune epoch ({args.images} images)", [f"{full_epoch[m]:.2f} s" for m in modes])
    if b32 is not None:
        for name, value in [("head-only epoch on cached features", f"{head_s:.4f} s"),
                            ("full epoch / head epoch", f"{full_epoch[False] / head_s:.0f}x"),
                            ("caching the features (once per run)", f"{cache_s:.2f} s")]:
            row(name, [value] + ["-"] * (len(modes) - 1))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        row("peak GPU memory allocated (whole run)", [f"{peak:.1f} GiB"] + ["-"] * (len(modes) - 1))


def _part(name: str, fn, *args):
    """``fn(*args)``, saying on stderr how long it took (compiling, warm-up and all)."""
    _say(f"{name} ...")
    start = time.perf_counter()
    out = fn(*args)
    _say(f"{name} done in {time.perf_counter() - start:.1f} s: {out}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("KENNEL_OFFLINE", "1")
    main()
