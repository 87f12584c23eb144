"""Write and read one split as memory-mapped ``.npy`` files: ``<split>_x.npy`` (N,3,S,S uint8), ``<split>_y.npy``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.data.manifest import SPLITS


def write_split(
    out_dir: Path,
    split: str,
    paths: Sequence[str | Path],
    labels: Sequence[int],
    size: int,
    load: Callable[[str | Path, int], np.ndarray],
    progress: Callable[[Iterable], Iterable] = iter,
) -> Path:
    """Decode each file with ``load`` straight into a memory map, so memory does not grow with N.

    Files are written under a temporary name and renamed at the end: a crash leaves no half-written split.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    x_path, y_path = out_dir / f"{split}_x.npy", out_dir / f"{split}_y.npy"
    tmp_x = x_path.with_suffix(".npy.tmp")
    x = np.lib.format.open_memmap(tmp_x, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
    for i in progress(range(len(paths))):
        x[i] = load(paths[i], size)
    x.flush()
    del x
    np.save(y_path, np.asarray(labels, dtype=np.int64))
    os.replace(tmp_x, x_path)
    return x_path


def read_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a split; images stay a read-only memory map."""
    x_path, y_path = Path(data_dir) / f"{split}_x.npy", Path(data_dir) / f"{split}_y.npy"
    for p in (x_path, y_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing; run the resize stage first (dvc repro resize)")
    x, y = np.load(x_path, mmap_mode="r"), np.load(y_path)
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != np.uint8 or len(x) != len(y):
        raise ValueError(f"{x_path}: expected uint8 N x 3 x S x S with {len(y)} rows, got {x.dtype} {x.shape}")
    return x, y


def write_splits(
    manifest: pd.DataFrame, root: Path, size: int, out_dir: Path,
    load: Callable[[str | Path, int], np.ndarray],
    progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it,
) -> dict[str, int]:
    """One array pair per split plus ``classes.json``; returns images per split."""
    classes = sorted(manifest["label"].unique())
    index = {name: i for i, name in enumerate(classes)}
    counts = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        paths = [_absolute(p, root) for p in rows["path"]]
        labels = [index[label] for label in rows["label"]]
        write_split(out_dir, split, paths, labels, size, load, partial(progress, desc=split))
        counts[split] = len(rows)
    meta = {"classes": classes, "size": size, "counts": counts}
    (out_dir / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts


def read_classes(data_dir: Path) -> list[str]:
    path = Path(data_dir) / "classes.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the resize stage first (dvc repro resize)")
    return json.loads(path.read_text())["classes"]


def _absolute(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p
