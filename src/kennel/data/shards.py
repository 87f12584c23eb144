"""Read the resized images: ``<dir>/index.csv`` (split, label, sha1, shard, row, in manifest order), the shards
``<dir>/shards/<id>.npy`` it points into (uint8 N x 3 x S x S rows) and ``classes.json``. What train, evaluate, the
audit and tracking read; the resize stage writes them (``shard_writer``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

INDEX_COLUMNS = ["split", "label", "sha1", "shard", "row"]


class ShardedImages:
    """The images of one split as one array-like N x 3 x S x S, read from the shards on demand.

    ``images[i]`` is a view into a memory-mapped shard (streaming); ``np.array(images)`` gathers the whole split
    into RAM with one read per shard (the resident path). Shards open lazily, once per process.
    """

    def __init__(self, shard_dir: Path, shards: np.ndarray, rows: np.ndarray, size: int):
        self.shard_dir, self.shards, self.rows = shard_dir, shards, rows
        self.shape = (len(rows), 3, size, size)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self._maps: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def _map(self, shard: str) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.load(self.shard_dir / f"{shard}.npy", mmap_mode="r")
        return self._maps[shard]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = range(len(self))[index]  # negative indices and bounds like an array
            return self._map(self.shards[i])[self.rows[i]]
        picked = np.arange(len(self))[index]
        out = np.empty((len(picked), *self.shape[1:]), np.uint8)
        if not len(picked):
            return out
        # Copy runs of consecutive rows of one shard with one slice each: a split written in one go is a few
        # long runs (shards are packed in manifest order), so this is as fast as copying one array.
        codes = pd.factorize(self.shards[picked])[0]
        rows = self.rows[picked]
        starts = np.flatnonzero(np.r_[True, (np.diff(codes) != 0) | (np.diff(rows) != 1)])
        for start, end in zip(starts, np.r_[starts[1:], len(picked)], strict=True):
            out[start:end] = self._map(self.shards[picked[start]])[rows[start]:rows[start] + end - start]
        return out

    def release(self) -> None:
        """Unmap the shards read so far: the pages a map has read count as this process's memory while it is
        mapped, so a pass over every image would otherwise grow with N. They reopen on the next read."""
        self._maps.clear()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def read_split(data_dir: Path, split: str) -> tuple[ShardedImages, np.ndarray]:
    """(images, labels) of a split from the shard index. ``"train+val"`` names the two together (in index order),
    as a refit on all labelled images reads them."""
    data_dir = Path(data_dir)
    meta, index = read_meta(data_dir), read_index(data_dir)
    rows = split_rows(index, split)
    images = ShardedImages(shard_folder(data_dir, meta), rows["shard"].to_numpy(),
                           rows["row"].to_numpy(np.int64), meta["size"])
    return images, split_labels(meta, rows)


def split_rows(index: pd.DataFrame, split: str) -> pd.DataFrame:
    """The index rows of ``split`` (``"train+val"``: both), in the order ``read_split`` reads them."""
    return index[index["split"].isin(split.split("+"))]


def split_labels(meta: dict, rows: pd.DataFrame) -> np.ndarray:
    """Class numbers of ``rows``, in ``meta``'s class order."""
    classes = {name: i for i, name in enumerate(meta["classes"])}
    return np.array([classes[label] for label in rows["label"]], dtype=np.int64)


def shard_folder(data_dir: Path, meta: dict) -> Path:
    """Where a data folder's shards are: its own ``shards/``, or the folder its ``classes.json`` names (relative to
    it) when the folder is only an index over another one's shards (``data/audited`` over ``data/resized``)."""
    return Path(data_dir) / meta.get("shards", "shards")


def read_index(data_dir: Path) -> pd.DataFrame:
    path = Path(data_dir) / "index.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; {_how_to_make(data_dir)}")
    index = pd.read_csv(path, dtype={c: str for c in INDEX_COLUMNS[:-1]}, keep_default_na=False)
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"{path}: lacks column(s) {', '.join(missing)}")
    return index


def read_meta(data_dir: Path) -> dict:
    """``classes.json``: class names, size, resize recipe, counts per split, data fingerprint."""
    path = Path(data_dir) / "classes.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; {_how_to_make(data_dir)}")
    return json.loads(path.read_text())


def _how_to_make(data_dir: Path) -> str:
    """The stage that writes a data folder: the audit writes the splits train reads, resize the shards."""
    stage = "audit" if Path(data_dir).name == "audited" else "resize"
    return f"run the {stage} stage first (dvc repro {stage})"


def read_classes(data_dir: Path) -> list[str]:
    return read_meta(data_dir)["classes"]
