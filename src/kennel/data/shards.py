"""Store the resized images so that a dataset that grows costs what it grew: content-addressed shards + an index.

``<out>/shards/<id>.npy`` holds uint8 N x 3 x S x S rows, each the pixels of one image; a shard's id is a hash
of the size, the resize recipe and the sha1 of every image in it, so a shard that exists holds exactly those
pixels. ``<out>/index.csv`` lists the manifest's images in manifest order (split, label, sha1, shard, row);
training reads that. A later run keeps every shard whose images are all still in the manifest, byte for byte
(DVC stores it once), decodes only images it has no row for, and packs them into new shards. A shard that lost an
image is rewritten from its remaining rows (no decoding), so a removed image is gone from the output too.

``write_split``/``read_split`` also read and write one plain ``<split>_x.npy`` per split (the layout before
shards): benchmarks compare the two through the same reader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.data.manifest import SPLITS, write_csv
from kennel.data.parallel import pmap

log = logging.getLogger(__name__)

Loader = Callable[[str | Path, int], np.ndarray]
_OPEN: dict[str, int] = {}  # per process: the files each writer writes into
# Shards of about this many bytes: few enough files for DVC to hash quickly, small enough that rewriting one
# (an image removed from it) or adding one (a few new images) stays cheap next to the dataset.
SHARD_BYTES = 64 << 20
INDEX_COLUMNS = ["split", "label", "sha1", "shard", "row"]


@dataclass(frozen=True)
class _RowWriter:
    """Decode a file and write it at a row of an array file: workers write in place, nothing is gathered.

    Plain positional writes, not a memory map: dirty pages of a map count as the process's memory until the
    kernel flushes them, so memory would grow with N; written with pwrite they are only page cache.
    """

    size: int
    load: Loader

    def __call__(self, item: tuple[str, int, str | Path]) -> None:
        file, position, path = item
        try:
            row = self.load(path, self.size)
        except Exception as err:  # noqa: BLE001 - name the file whatever broke
            raise RuntimeError(f"{path}: {type(err).__name__}: {err}") from None
        if row.shape != (3, self.size, self.size) or row.dtype != np.uint8:
            expected = f"uint8 (3, {self.size}, {self.size})"
            raise RuntimeError(f"{path}: loader gave {row.dtype} {row.shape}, expected {expected}")
        if file not in _OPEN:
            _OPEN[file] = os.open(file, os.O_WRONLY)
        os.pwrite(_OPEN[file], row.tobytes(), position)


def _create(path: Path, rows: int, size: int) -> int:
    """An .npy of ``rows`` x 3 x size x size uint8 (sparse until written); returns the offset of row 0."""
    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, 3, size, size))
    offset = header.offset
    del header
    return offset


def _fill(targets: Sequence[Path], decode: list[tuple[str, int, str | Path]], size: int, load: Loader,
          workers: int | str, desc: str) -> None:
    """Decode ``(file, byte position, image path)`` items into the created ``targets``; on failure remove them."""
    writer = _RowWriter(size, load)
    try:
        for _ in pmap(writer, decode, workers, desc=desc):
            pass
    except BaseException:
        for t in targets:
            t.unlink(missing_ok=True)
        raise
    finally:
        for t in targets:
            if str(t) in _OPEN:
                os.close(_OPEN.pop(str(t)))


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
    offset, row_bytes = _create(tmp, len(paths), size), 3 * size * size
    items = [(str(tmp), offset + i * row_bytes, p) for i, p in enumerate(paths)]
    _fill([tmp], items, size, load, workers, f"resize {split}")
    np.save(y_path, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, x_path)
    return x_path


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


def read_split(data_dir: Path, split: str) -> tuple[np.ndarray | ShardedImages, np.ndarray]:
    """(images, labels) of a split: from the shard index, or from a plain ``<split>_x.npy`` (a memory map).
    ``"train+val"`` names the two together (in index order), as a refit on all labelled images reads them."""
    data_dir = Path(data_dir)
    if (data_dir / "index.csv").exists():
        meta, index = read_meta(data_dir), read_index(data_dir)
        rows = index[index["split"].isin(split.split("+"))]
        classes = {name: i for i, name in enumerate(meta["classes"])}
        images = ShardedImages(shard_folder(data_dir, meta), rows["shard"].to_numpy(),
                               rows["row"].to_numpy(np.int64), meta["size"])
        return images, np.array([classes[label] for label in rows["label"]], dtype=np.int64)
    if "+" in split:
        parts = [read_split(data_dir, part) for part in split.split("+")]
        return np.concatenate([np.asarray(x) for x, _ in parts]), np.concatenate([y for _, y in parts])
    x_path, y_path = data_dir / f"{split}_x.npy", data_dir / f"{split}_y.npy"
    for p in (x_path, y_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing; run the resize stage first (dvc repro resize)")
    x, y = np.load(x_path, mmap_mode="r"), np.load(y_path)
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != np.uint8 or len(x) != len(y):
        raise ValueError(f"{x_path}: expected uint8 N x 3 x S x S with {len(y)} rows, got {x.dtype} {x.shape}")
    return x, y


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


@dataclass
class Written:
    """What one resize run did: images per split, and how many it decoded, copied from a shard or kept as is."""

    counts: dict[str, int]
    decoded: int = 0
    copied: int = 0
    kept: int = 0
    shards_written: list[str] = field(default_factory=list)


def shard_id(size: int, recipe: str, sha1s: Sequence[str]) -> str:
    return hashlib.sha256(f"{size}|{recipe}|{','.join(sha1s)}".encode()).hexdigest()[:20]


def _previous_shards(out_dir: Path, size: int, recipe: str) -> dict[str, list[str]]:
    """Shard id -> its images' sha1 in row order, from the last run's index when it used this size and recipe.

    Only shards whose file is there with the expected shape and whose id matches their content count: anything
    else (another recipe, a crash half way, a hand-edited file) is redone.
    """
    try:
        meta, index = read_meta(out_dir), read_index(out_dir)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return {}
    if meta.get("size") != size or meta.get("recipe") != recipe:
        return {}
    shards = {}
    for shard, group in index.sort_values(["shard", "row"]).groupby("shard", sort=False):
        sha1s = group["sha1"].tolist()
        path = out_dir / "shards" / f"{shard}.npy"
        if shard != shard_id(size, recipe, sha1s) or group["row"].tolist() != list(range(len(sha1s))):
            continue
        try:
            shape = np.load(path, mmap_mode="r").shape
        except (OSError, ValueError):
            continue
        if shape == (len(sha1s), 3, size, size):
            shards[shard] = sha1s
    return shards


def _plan(previous: dict[str, list[str]], wanted: set[str], rows_per_shard: int) -> tuple[list[str], list[str]]:
    """(shards kept as they are, sha1s to pack into new shards, in no particular order).

    A shard is kept when all its images are wanted. The rest of the wanted images (new ones, and the survivors
    of shards that lost an image) are packed anew, together with the smallest kept shards that are under half
    full as long as that at most doubles what is packed: many small additions do not leave many tiny shards.
    """
    keep, pack = [], []
    for shard, sha1s in previous.items():
        if set(sha1s) <= wanted:
            keep.append(shard)
        else:
            pack += [s for s in sha1s if s in wanted]
    have = {s for shard in keep for s in previous[shard]}
    pack += wanted - have - set(pack)
    if pack:
        budget = len(pack)
        for shard in sorted((s for s in keep if len(previous[s]) < rows_per_shard // 2),
                            key=lambda s: (len(previous[s]), s)):
            if len(previous[shard]) > budget:
                break
            budget -= len(previous[shard])
            keep.remove(shard)
            pack += previous[shard]
    return keep, pack


def write_splits(
    manifest: pd.DataFrame, root: Path, size: int, out_dir: Path, load: Loader, workers: int | str = 1,
    recipe: str = "",
) -> Written:
    """Shards + ``index.csv`` + ``classes.json`` for the manifest, reusing what ``out_dir`` already holds.

    ``classes.json`` also holds a fingerprint of the data (manifest rows, size, ``recipe`` such as the resize
    mode): a training checkpoint made on other data is not resumed. The result is the same pixels in the same
    order whatever ``out_dir`` held before; only the grouping into shards depends on the history.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(exist_ok=True)
    previous = _previous_shards(out_dir, size, recipe)
    path_of = dict(zip(manifest["sha1"], manifest["path"], strict=True))
    rows_per_shard = max(1, SHARD_BYTES // (3 * size * size))
    keep, pack = _plan(previous, set(path_of), rows_per_shard)
    position = {s: i for i, s in enumerate(manifest["sha1"])}
    pack = sorted(pack, key=position.__getitem__)  # manifest order: a split reads back in long runs of rows
    where = {s: (shard, row) for shard in keep for row, s in enumerate(previous[shard])}
    old_rows = {s: (shard, row) for shard, sha1s in previous.items() for row, s in enumerate(sha1s)}

    chunks = [pack[i:i + rows_per_shard] for i in range(0, len(pack), rows_per_shard)]
    written = Written({}, kept=len(where))
    targets, decode = [], []
    row_bytes = 3 * size * size
    for chunk in chunks:
        shard = shard_id(size, recipe, chunk)
        tmp = shard_dir / f".{shard}.npy.tmp"
        offset = _create(tmp, len(chunk), size)
        targets.append(tmp)
        copies = []
        for row, s in enumerate(chunk):
            where[s] = (shard, row)
            if s in old_rows:
                copies.append((row, *old_rows[s]))
            else:
                decode.append((str(tmp), offset + row * row_bytes, _absolute(path_of[s], root)))
        _copy_rows(tmp, offset, copies, shard_dir)
        written.copied += len(copies)
    written.decoded = len(decode)
    _fill(targets, decode, size, load, workers, "resize")
    for tmp in targets:
        os.replace(tmp, shard_dir / tmp.name[1:-len(".tmp")])
        written.shards_written.append(tmp.name[1:-len(".npy.tmp")])

    index = manifest[["split", "label", "sha1"]].copy()
    index["shard"] = [where[s][0] for s in index["sha1"]]
    index["row"] = [where[s][1] for s in index["sha1"]]
    write_csv(index, out_dir / "index.csv")
    live = {f"{shard}.npy" for shard, _ in where.values()}
    for stale in shard_dir.iterdir():  # shards of removed images or another recipe, and crash leftovers
        if stale.name not in live:
            stale.unlink()
    for legacy in out_dir.glob("*_[xy].npy"):  # the per-split arrays of the layout before shards
        legacy.unlink()

    classes = sorted(manifest["label"].unique())
    written.counts = {split: int((manifest["split"] == split).sum()) for split in SPLITS}
    rows = manifest[["path", "label", "split", "sha1"]].to_csv(index=False)
    fingerprint = hashlib.sha256(f"{rows}|{size}|{recipe}".encode()).hexdigest()
    meta = {"classes": classes, "size": size, "recipe": recipe, "counts": written.counts, "fingerprint": fingerprint}
    (out_dir / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return written


def _copy_rows(target: Path, offset: int, copies: list[tuple[int, str, int]], shard_dir: Path) -> None:
    """Copy rows ``(row in target, source shard, source row)`` from existing shards: no decoding needed."""
    if not copies:
        return
    fd = os.open(target, os.O_WRONLY)
    try:
        for row, shard, source_row in copies:
            data = np.load(shard_dir / f"{shard}.npy", mmap_mode="r")[source_row]
            os.pwrite(fd, data.tobytes(), offset + row * data.nbytes)
    finally:
        os.close(fd)


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


def _absolute(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p
