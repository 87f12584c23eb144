"""One vector per image, computed once per data version: content-addressed chunks keyed by image sha1.

``<dir>/chunks/<id>.npy`` holds the vectors of the images one run had to compute (rows in that run's order), its
id a hash of the featurizer's fingerprint and those sha1s; ``<dir>/index.csv`` maps sha1 -> (chunk, row) and
``<dir>/meta.json`` names the fingerprint (model, weights, size, resize recipe). A later run with the same
fingerprint computes only the sha1s the index lacks; another fingerprint starts over. Vectors are written row by
row with positional writes and read back per block, so memory does not grow with the number of images.

The audit writes the cache (``update_cache``); training reads the same vectors (``open_cache``): the pretrained
backbone's pooled features of each image, which a frozen phase trains its head on, are stored as computed, and
the audit reads them through its view (the L2-normalised mean of an image's and its mirror's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from kennel.data.manifest import write_csv

log = logging.getLogger(__name__)

CHUNK_ROWS = 16384  # vectors per chunk file: 80 MB of 2 x 1280 float16 features


@dataclass(frozen=True)
class Featurizer:
    """uint8 N x 3 x S x S -> N x dim vectors of ``dtype`` (what is stored); ``fingerprint`` names everything the
    values depend on. ``view`` turns stored rows into the vectors compared, when they differ."""

    kind: str  # "embedding" (pooled backbone features of each image and its mirror) or "phash" (hash bits)
    fingerprint: str
    dim: int
    dtype: str
    compute: Callable[[np.ndarray], np.ndarray]
    view: Callable[[np.ndarray], np.ndarray] | None = None
    batch: int = 64  # images per ``compute`` call when the caller leaves it to the featurizer

    def vectors(self, images: np.ndarray) -> np.ndarray:
        """The compared vectors of ``images``, as the cache returns them."""
        stored = self.compute(images)
        return self.view(stored) if self.view else stored


class FeatureCache:
    """The cached vectors of a list of sha1s, read back in blocks (a gather from the chunks each block touches):
    ``take``/``block`` through the featurizer's view, ``raw`` as stored."""

    def __init__(self, cache_dir: Path, sha1s: Sequence[str], where: dict[str, tuple[str, int]], dim: int,
                 dtype: str, view: Callable[[np.ndarray], np.ndarray] | None = None):
        self.cache_dir, self.sha1s, self.dim, self.dtype = Path(cache_dir), list(sha1s), dim, np.dtype(dtype)
        self.view = view
        self.chunks = np.array([where[s][0] for s in self.sha1s], dtype=object)
        self.rows = np.array([where[s][1] for s in self.sha1s], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sha1s)

    def block(self, start: int, stop: int) -> np.ndarray:
        return self.take(np.arange(start, min(stop, len(self))))

    def take(self, positions: np.ndarray) -> np.ndarray:
        stored = self.raw(positions)
        return self.view(stored) if self.view else stored

    def raw(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.dim), self.dtype)
        chunks = self.chunks[positions]
        for chunk in dict.fromkeys(chunks):
            mask = chunks == chunk
            data = np.load(self.cache_dir / "chunks" / f"{chunk}.npy", mmap_mode="r")
            out[mask] = data[self.rows[positions][mask]]
            del data  # unmapped again: the pages read are not kept as this process's memory
        return out


def chunk_id(fingerprint: str, sha1s: Sequence[str]) -> str:
    return hashlib.sha256(f"{fingerprint}|{','.join(sha1s)}".encode()).hexdigest()[:20]


def update_cache(cache_dir: Path, featurizer: Featurizer, sha1s: Sequence[str], images, batch_size: int,
                 desc: str = "embed") -> tuple[FeatureCache, int]:
    """Vectors for every sha1 (``images[i]`` is the uint8 image of ``sha1s[i]``), computing only those the cache
    lacks; returns (the cache over ``sha1s``, how many were computed). Chunks no wanted sha1 is in are deleted."""
    cache_dir = Path(cache_dir)
    (cache_dir / "chunks").mkdir(parents=True, exist_ok=True)
    where = _read(cache_dir, featurizer.fingerprint)
    wanted = set(sha1s)
    todo = [i for i, s in enumerate(sha1s) if s not in where]  # sha1s are unique: prepare keeps equal bytes once
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=None, leave=False)
    for start in range(0, len(todo), CHUNK_ROWS):
        part = todo[start:start + CHUNK_ROWS]
        chunk = chunk_id(featurizer.fingerprint, [sha1s[i] for i in part])
        _write_chunk(cache_dir / "chunks" / f"{chunk}.npy", featurizer, part, images, batch_size, bar)
        where.update({sha1s[i]: (chunk, row) for row, i in enumerate(part)})
    bar.close()
    live = {chunk for s, (chunk, _) in where.items() if s in wanted}
    for path in (cache_dir / "chunks").iterdir():  # chunks of removed images, another fingerprint, crash leftovers
        if path.name.removesuffix(".npy") not in live:
            path.unlink()
    where = {s: w for s, w in where.items() if w[0] in live}
    rows = pd.DataFrame([(s, c, r) for s, (c, r) in where.items()], columns=["sha1", "chunk", "row"])
    write_csv(rows.sort_values(["chunk", "row"]), cache_dir / "index.csv")
    (cache_dir / "meta.json").write_text(json.dumps(
        {"fingerprint": featurizer.fingerprint, "kind": featurizer.kind, "dim": featurizer.dim,
         "dtype": featurizer.dtype}, indent=2) + "\n")
    return FeatureCache(cache_dir, sha1s, where, featurizer.dim, featurizer.dtype, featurizer.view), len(todo)


def open_cache(cache_dir: Path, fingerprint: str, sha1s: Sequence[str]) -> FeatureCache | None:
    """The stored vectors of ``sha1s`` in a cache made with ``fingerprint``, read as stored; None when the cache
    was made otherwise or lacks any of them (the caller computes them then)."""
    where = _read(Path(cache_dir), fingerprint, quiet=True)
    if not where or any(s not in where for s in sha1s):
        return None
    meta = json.loads((Path(cache_dir) / "meta.json").read_text())
    return FeatureCache(cache_dir, sha1s, where, int(meta["dim"]), meta["dtype"])


def _read(cache_dir: Path, fingerprint: str, quiet: bool = False) -> dict[str, tuple[str, int]]:
    """sha1 -> (chunk, row) of a cache made with ``fingerprint``, for the chunks whose file is whole; else {}."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        index = pd.read_csv(cache_dir / "index.csv", dtype={"sha1": str, "chunk": str}, keep_default_na=False)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return {}
    if meta.get("fingerprint") != fingerprint:
        if quiet:
            return {}
        log.info("%s: made with other features (%s); computing every image again", cache_dir, meta.get("kind"))
        return {}
    where = {}
    for chunk, group in index.groupby("chunk", sort=False):
        try:
            rows = np.load(cache_dir / "chunks" / f"{chunk}.npy", mmap_mode="r").shape[0]
        except (OSError, ValueError):
            continue
        if group["row"].max() < rows:
            where.update(zip(group["sha1"], zip(group["chunk"], group["row"].astype(int), strict=True), strict=True))
    return where


def _write_chunk(path: Path, featurizer: Featurizer, positions: list[int], images, batch_size: int, bar) -> None:
    """Compute the vectors of ``images[positions]`` batch by batch into a new ``.npy`` (temp name, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    header = np.lib.format.open_memmap(tmp, mode="w+", dtype=featurizer.dtype, shape=(len(positions), featurizer.dim))
    offset, row_bytes = header.offset, header.itemsize * featurizer.dim
    del header
    fd = os.open(tmp, os.O_WRONLY)
    try:
        for start in range(0, len(positions), batch_size):
            picked = np.asarray(positions[start:start + batch_size])
            vectors = np.ascontiguousarray(featurizer.compute(images[picked]), dtype=featurizer.dtype)
            os.pwrite(fd, vectors.tobytes(), offset + start * row_bytes)
            bar.update(len(picked))
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
