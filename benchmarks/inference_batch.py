"""Inference batch benchmark: images per second of a forward pass by batch size, side by side in one run.

    python benchmarks/inference_batch.py [--photos DIR] [--weights FILE] [--n 192] [--device cpu]

Each torchvision arch (MobileNetV2 with --weights' features when given, ResNet-18, EfficientNet-B0: random init
otherwise, which does not change the speed) runs the same N images as kennel's inference passes do (a Classifier in
eval mode, channels_last, under the autocast `train.amp: auto` picks, and in fp32), at each batch size, after one
warm-up pass per size. Every row also says whether the logits are bit for bit those of the largest batch: the batch
an inference pass runs at (kennel.core.device.inference_batch) may change its speed, never its numbers.
The images are real photos from --photos (any folder of images, searched recursively), else random pixels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hostinfo import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kennel.core.device import amp_name, inference_batch, resolve_amp, resolve_device, to_device  # noqa: E402
from kennel.data.images import load_array  # noqa: E402
from kennel.model.network import build_model  # noqa: E402

BATCHES = (64, 32, 16, 8, 4)
SUFFIXES = {".jpg", ".jpeg", ".png"}


def images(folder: Path | None, n: int, size: int = 224) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)[:n] if folder else []
    if files:
        return np.stack([load_array(p, size, mode="center_crop") for p in files])
    return np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def logits(model: torch.nn.Module, x: torch.Tensor, batch: int, amp: torch.dtype | None) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)]).cpu()


def measure(arch: str, weights: str, x: torch.Tensor, amp: torch.dtype | None) -> list[dict]:
    model, _ = build_model(arch, [str(i) for i in range(10)], weights=weights)
    model = model.to(x.device, memory_format=torch.channels_last).eval()
    rows, reference = [], None
    for batch in BATCHES:
        logits(model, x[:batch], batch, amp)  # kernels chosen and primitives built for this shape
        start = time.perf_counter()
        out = logits(model, x, batch, amp)
        seconds = time.perf_counter() - start
        reference = out if reference is None else reference
        rows.append({"arch": arch, "precision": amp_name(amp) if amp else "fp32", "batch": batch,
                     "img_s": len(x) / seconds, "same": torch.equal(out, reference)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, help="a folder of images (default: random pixels)")
    parser.add_argument("--weights", default="none", help="MobileNetV2 weights file (default: random init)")
    parser.add_argument("--n", type=int, default=192, help="images per measurement")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    x = to_device(torch.from_numpy(images(args.photos, args.n)), device)
    amp = resolve_amp("auto", device)
    print(f"{machine()}; device {device}, {torch.get_num_threads()} torch threads; {len(x)} images of "
          f"{'photos' if args.photos else 'random pixels'}; kennel's inference batch here: "
          f"{inference_batch(device)}\n")
    print("| arch | precision | " + " | ".join(f"batch {b}" for b in BATCHES) + " | best / 64 |")
    print("|---|---|" + "--:|" * (len(BATCHES) + 1))
    for arch, weights in (("mobilenet_v2", args.weights), ("resnet18", "none"), ("efficientnet_b0", "none")):
        for precision in ([amp] if amp else []) + [None]:
            rows = measure(arch, weights, x, precision)
            cells = [f"{r['img_s']:.0f}{'' if r['same'] else ' (differs)'}" for r in rows]
            print(f"| {arch} | {rows[0]['precision']} | " + " | ".join(cells)
                  + f" | {max(r['img_s'] for r in rows) / rows[0]['img_s']:.2f}x |", flush=True)
    print("\nimages/s after one warm-up pass per size; (differs): logits not bit for bit those of batch 64")
    return 0


if __name__ == "__main__":
    sys.exit(main())
