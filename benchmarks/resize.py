"""Resize benchmark: the naive per-image loop vs kennel's resize, on the same generated JPEGs, in one run.

    python benchmarks/resize.py [--n 2000] [--size 224]

Generates (does not ship) a mixed set of JPEGs, mostly 300-500 px with ~5% at 1500-3000 px, then times, each in its
own process on the same warm files:
  naive   the loop a notebook would write: Image.open -> convert("RGB") -> resize -> np.array, one process,
          arrays stacked at the end
  kennel  plain_arrays.write_split with load_array (draft-mode JPEG decode, workers=auto, rows written
          straight into the .npy file)
at N/2 and N images, and prints images/s, the speed ratio, and the peak RSS of each (summed over worker processes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from hostinfo import machine, run_child
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"


def _make_jpeg(item: tuple[int, str]) -> None:
    i, folder = item
    rng = np.random.default_rng(i)
    if rng.random() < 0.05:
        w, h = rng.integers(1500, 3001, size=2)
    else:
        w, h = rng.integers(300, 501, size=2)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(w, h)
    img = np.stack([x * 200 + 30, y * 180 + 40, (x + y) * 90 + 20], axis=-1)
    for _ in range(6):  # soft blobs, then sensor-like noise: compresses like a photo
        cx, cy, r = rng.uniform(0, 1, 3)
        img += rng.uniform(-80, 80) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.005 + r * 0.05))[..., None]
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(f"{folder}/{i:05d}.jpg", quality=88)


def naive(paths: list[str], size: int) -> None:
    arrays = [np.array(Image.open(p).convert("RGB").resize((size, size))) for p in paths]
    np.stack(arrays)


def kennel(paths: list[str], size: int, out: str) -> None:
    sys.path.insert(0, str(SRC))
    from plain_arrays import write_split

    from kennel.data.images import load_array

    write_split(Path(out), "bench", paths, [0] * len(paths), size, partial(load_array, mode="squash"), "auto")


def _child(args: argparse.Namespace) -> None:
    paths = Path(args.list).read_text().split("\n")
    start = time.perf_counter()
    naive(paths, args.size) if args.method == "naive" else kennel(paths, args.size, args.out)
    print(f"{time.perf_counter() - start:.6f}")


def measure(method: str, paths: list[str], size: int, work: Path) -> tuple[float, float]:
    """(seconds inside the child, peak RSS in MiB of the child and all its workers, sampled every 10 ms)."""
    listing = work / f"{method}-{len(paths)}.txt"
    listing.write_text("\n".join(paths))
    cmd = [sys.executable, __file__, "--child", method, "--list", str(listing), "--size", str(size),
           "--out", str(work / f"out-{method}-{len(paths)}")]
    last, rss = run_child(cmd, method)
    return float(last), rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--child", choices=["naive", "kennel"], help=argparse.SUPPRESS)
    parser.add_argument("--list", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.method = args.child
        return _child(args)

    with tempfile.TemporaryDirectory(prefix="kennel-resize-bench-") as tmp:
        work = Path(tmp)
        (work / "jpegs").mkdir()
        start = time.perf_counter()
        sys.path.insert(0, str(SRC))
        from kennel.data.parallel import pmap

        for _ in pmap(_make_jpeg, [(i, str(work / "jpegs")) for i in range(args.n)], "auto", desc="generate"):
            pass
        paths = sorted(str(p) for p in (work / "jpegs").glob("*.jpg"))
        large = sum(1 for p in paths if max(Image.open(p).size) >= 1500)
        print(f"machine: {machine()}")
        print(f"generated {len(paths)} JPEGs ({large} of 1500-3000 px, the rest 300-500 px) "
              f"in {time.perf_counter() - start:.0f}s; target {args.size}x{args.size}\n")
        rows = []
        for n in (len(paths) // 2, len(paths)):
            for method in ("naive", "kennel"):
                seconds, rss = measure(method, paths[:n], args.size, work)
                rows.append((method, n, seconds, n / seconds, rss))
        print("| method | images | seconds | images/s | peak RSS (MiB) |")
        print("|---|---|---|---|---|")
        for method, n, seconds, rate, rss in rows:
            print(f"| {method} | {n} | {seconds:.1f} | {rate:.0f} | {rss:.0f} |")
        rate = {(m, n): r for m, n, _, r, _ in rows}
        rss = {(m, n): v for m, n, _, _, v in rows}
        half, full = len(paths) // 2, len(paths)
        print(f"\nspeed ratio kennel/naive at {full} images: {rate['kennel', full] / rate['naive', full]:.2f}x")
        for method in ("naive", "kennel"):
            print(f"peak RSS {method}: {rss[method, half]:.0f} MiB at {half} -> {rss[method, full]:.0f} MiB at {full} "
                  f"({rss[method, full] / rss[method, half]:.2f}x)")


if __name__ == "__main__":
    main()
