"""Store the resized images so that a dataset that grows costs what it grew: content-addressed shards + an index.

``<out>/shards/<id>.npy`` holds uint8 N x 3 x S x S rows, each the pixels of one image; a shard's id is a hash
of the size, the resize recipe and the sha1 of every image in it, so a shard that exists holds exactly those
pixels. ``<out>/index.csv`` lists the manifest's images in manifest order (split, label, sha1, shard, row);
training reads that (``shards``). A later run keeps every shard whose images are all still in the manifest, byte for
byte (DVC stores it once), decodes only images it has no row for, and packs them into new shards. A shard that lost
an image is rewritten from its remaining rows (no decoding), so a removed image is gone from the output too.
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
from kennel.data.shards import read_index, read_meta

log = logging.getLogger(__name__)

Loader = Callable[[str | Path, int], np.ndarray]
_OPEN: dict[str, int] = {}  # per process: the files each writer writes into
# Shards of about this many bytes: few enough files for DVC to hash quickly, small enough that rewriting one
# (an image removed from it) or adding one (a few new images) stays cheap next to the dataset.
SHARD_BYTES = 64 << 20


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


def create_rows(path: Path, rows: int, size: int) -> int:
    """An .npy of ``rows`` x 3 x size x size uint8 (sparse until written); returns the offset of row 0."""
    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, 3, size, size))
    offset = header.offset
    del header
    return offset


def fill_rows(targets: Sequence[Path], decode: list[tuple[str, int, str | Path]], size: int, load: Loader,
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
        offset = create_rows(tmp, len(chunk), size)
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
    fill_rows(targets, decode, size, load, workers, "resize")
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


def _absolute(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p
