"""Write and read one split as ``.npy`` files: ``<split>_x.npy`` (N,3,S,S uint8) and ``<split>_y.npy``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.data.manifest import SPLITS
from kennel.data.parallel import pmap

Loader = Callable[[str | Path, int], np.ndarray]
_OPEN: dict[str, int] = {}  # per process: the file each writer writes into


@dataclass(frozen=True)
class _RowWriter:
    """Decode item i and write it at row i of the array file: workers write in place, nothing is gathered.

    Plain positional writes, not a memory map: dirty pages of a map count as the process's memory until the
    kernel flushes them, so memory would grow with N; written with pwrite they are only page cache.
    """

    file: str
    offset: int
    size: int
    load: Loader

    def __call__(self, item: tuple[int, str | Path]) -> None:
        i, path = item
        try:
            row = self.load(path, self.size)
        except Exception as err:  # noqa: BLE001 - name the file whatever broke
            raise RuntimeError(f"{path}: {type(err).__name__}: {err}") from None
        if row.shape != (3, self.size, self.size) or row.dtype != np.uint8:
            expected = f"uint8 (3, {self.size}, {self.size})"
            raise RuntimeError(f"{path}: loader gave {row.dtype} {row.shape}, expected {expected}")
        if self.file not in _OPEN:
            _OPEN[self.file] = os.open(self.file, os.O_WRONLY)
        os.pwrite(_OPEN[self.file], row.tobytes(), self.offset + i * row.nbytes)


def write_split(
    out_dir: Path, split: str, paths: Sequence[str | Path], labels: Sequence[int], size: int, load: Loader,
    workers: int | str = 1,
) -> Path:
    """Decode each file with ``load`` (in ``workers`` processes) straight into ``<split>_x.npy``.

    Memory stays flat whatever N is. Files are written under a temporary name and renamed at the end: a crash
    leaves no half-written split.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    x_path, y_path = out_dir / f"{split}_x.npy", out_dir / f"{split}_y.npy"
    tmp = out_dir / f".{split}_x.npy.tmp"
    header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
    offset = header.offset  # the file now has its header and full (sparse) length
    del header
    writer = _RowWriter(str(tmp), offset, size, load)
    try:
        for _ in pmap(writer, list(enumerate(paths)), workers, desc=f"resize {split}"):
            pass
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if str(tmp) in _OPEN:
            os.close(_OPEN.pop(str(tmp)))
    np.save(y_path, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, x_path)
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
    manifest: pd.DataFrame, root: Path, size: int, out_dir: Path, load: Loader, workers: int | str = 1,
    recipe: str = "",
) -> dict[str, int]:
    """One array pair per split plus ``classes.json``; returns images per split.

    ``classes.json`` also holds a fingerprint of the data (manifest rows, size, ``recipe`` such as the resize
    mode): a training checkpoint made on other data is not resumed.
    """
    classes = sorted(manifest["label"].unique())
    index = {name: i for i, name in enumerate(classes)}
    counts = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        paths = [_absolute(p, root) for p in rows["path"]]
        labels = [index[label] for label in rows["label"]]
        write_split(out_dir, split, paths, labels, size, load, workers)
        counts[split] = len(rows)
    rows = manifest[["path", "label", "split", "sha1"]].to_csv(index=False)
    fingerprint = hashlib.sha256(f"{rows}|{size}|{recipe}".encode()).hexdigest()
    meta = {"classes": classes, "size": size, "counts": counts, "fingerprint": fingerprint}
    (out_dir / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts


def read_meta(data_dir: Path) -> dict:
    """``classes.json``: class names, size, counts per split, data fingerprint."""
    path = Path(data_dir) / "classes.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the resize stage first (dvc repro resize)")
    return json.loads(path.read_text())


def read_classes(data_dir: Path) -> list[str]:
    return read_meta(data_dir)["classes"]


def _absolute(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p
