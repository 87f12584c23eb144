"""The layout before shards, kept for the benchmarks that compare against it: one ``<split>_x.npy`` (uint8
N x 3 x S x S) and ``<split>_y.npy`` per split, written with the resize stage's own decode."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kennel.data.shard_writer import Loader, create_rows, fill_rows


def write_split(
    out_dir: Path, split: str, paths: Sequence[str | Path], labels: Sequence[int], size: int, load: Loader,
    workers: int | str = 1,
) -> Path:
    """Decode each file with ``load`` (in ``workers`` processes) straight into one ``<split>_x.npy``.

    Memory stays flat whatever N is. Files are written under a temporary name and renamed at the end: a crash
    leaves no half-written split.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    x_path, y_path = out_dir / f"{split}_x.npy", out_dir / f"{split}_y.npy"
    tmp = out_dir / f".{split}_x.npy.tmp"
    offset, row_bytes = create_rows(tmp, len(paths), size), 3 * size * size
    items = [(str(tmp), offset + i * row_bytes, p) for i, p in enumerate(paths)]
    fill_rows([tmp], items, size, load, workers, f"resize {split}")
    np.save(y_path, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, x_path)
    return x_path


def read_plain(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images as a memory map, labels) of a split written by ``write_split``."""
    x_path, y_path = Path(data_dir) / f"{split}_x.npy", Path(data_dir) / f"{split}_y.npy"
    for p in (x_path, y_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing")
    x, y = np.load(x_path, mmap_mode="r"), np.load(y_path)
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != np.uint8 or len(x) != len(y):
        raise ValueError(f"{x_path}: expected uint8 N x 3 x S x S with {len(y)} rows, got {x.dtype} {x.shape}")
    return x, y
