"""Decide for one file whether it is a usable image, by decoding all of it, and why not if it is not."""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from kennel.data.images import bomb_message, open_header, to_rgb
from kennel.data.parallel import pmap
from kennel.data.sources import Candidate

# Rejection reasons: the vocabulary of reports/rejects.csv.
EMPTY = "empty file"
NOT_IMAGE = "not an image"
CORRUPT = "truncated or corrupt"
BOMB = "decompression bomb"
TOO_SMALL = "too small"
UNREADABLE = "unreadable"
DUPLICATE = "duplicate"
LABEL_CONFLICT = "label conflict"


@dataclass(frozen=True)
class Inspection:
    reason: str = ""  # empty: a usable image
    detail: str = ""
    sha1: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    mode: str = ""


@dataclass(frozen=True)
class Inspector:
    """Picklable settings for ``inspect_image``, so worker processes can run it."""

    min_size: int
    max_pixels: int

    def __call__(self, path: Path) -> Inspection:
        return inspect_image(path, self.min_size, self.max_pixels)


def inspect_image(path: Path, min_size: int, max_pixels: int) -> Inspection:
    """Open by content (the suffix is ignored), check size limits from the header, then decode every pixel."""
    try:
        sha1, head = _sha1_and_head(Path(path))
    except OSError as err:
        return Inspection(UNREADABLE, f"{type(err).__name__}: {err}")
    if not head:
        return Inspection(EMPTY)
    try:
        img = open_header(path)
    except UnidentifiedImageError:
        return Inspection(NOT_IMAGE, f"starts with {head!r}", sha1)
    except (OSError, SyntaxError, ValueError) as err:
        return Inspection(CORRUPT, f"{type(err).__name__}: {err}", sha1)
    with img:
        w, h, fmt, mode = img.width, img.height, img.format or "", img.mode
        refused = _by_header(Inspection("", "", sha1, w, h, fmt, mode), min_size, max_pixels)
        if refused:
            return refused
        try:
            img.seek(0)  # animated images: the first frame is what training sees
            img.load()
            to_rgb(img)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            return Inspection(CORRUPT, f"{type(err).__name__}: {err}", sha1, w, h, fmt, mode)
    return Inspection("", "", sha1, w, h, fmt, mode)


def _by_header(seen: Inspection, min_size: int, max_pixels: int) -> Inspection | None:
    """The verdict the header's size gives under these limits (bomb, too small); None: a decode must tell."""
    w, h = seen.width, seen.height
    facts = (seen.sha1, w, h, seen.format, seen.mode)
    if bomb_message(w, h, max_pixels):
        return Inspection(BOMB, bomb_message(w, h, max_pixels), *facts)
    if min(w, h) < min_size:
        return Inspection(TOO_SMALL, f"{w}x{h}, shorter side < data.min_size {min_size}", *facts)
    return None


def reuse(seen: Inspection, min_size: int, max_pixels: int) -> Inspection | None:
    """This run's inspection of bytes inspected before (maybe under other limits), or None if they need a decode.

    Gives exactly what ``inspect_image`` would: a header that did not open does not depend on the limits; one
    that did is judged again by size; a full decode, done before, is only needed where none was done.
    """
    if not seen.width:  # not an image, or a header that did not parse
        return seen
    return _by_header(seen, min_size, max_pixels) or (seen if seen.reason in ("", CORRUPT) else None)


def _sha1_and_head(path: Path) -> tuple[str, bytes]:
    """Content hash read in chunks (a stray multi-GB file must not be loaded whole) and the first bytes."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        head = f.read(16)
        h.update(head)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest(), head


def file_stats(paths: Sequence[Path]) -> list[str]:
    """Each file's identity on this machine (device, inode, size, mtime), "" for one that cannot be stat'ed.

    Taken before any byte is read: a file that changes afterwards has another identity in the next run and is
    hashed again. The same identity means the same bytes (what DVC and git also assume), so its sha1 is reused.
    """
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append("")
            continue
        out.append(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return out


def _hash(path: Path) -> str:
    try:
        sha1, head = _sha1_and_head(Path(path))
    except OSError:
        return ""  # inspected in full, which reports why
    return sha1 if head else ""


@dataclass(frozen=True)
class Scan:
    """What earlier runs saw: inspections by content (``data/scan.csv``), content by file identity (local)."""

    by_sha1: Mapping[str, Inspection] = field(default_factory=dict)
    by_file: Mapping[str, str] = field(default_factory=dict)  # file_stats identity -> sha1


def inspect_all(
    candidates: Sequence[Candidate], min_size: int, max_pixels: int, workers: int | str = 1,
    seen: Scan | None = None, stats: Sequence[str] | None = None,
) -> list[Inspection | None]:
    """Inspect every candidate the layout did not already reject (None for those), in ``workers`` processes.

    ``seen`` (``read_scan``) holds earlier inspections by sha1: those files are not decoded again unless the
    limits now ask for a decode that was never done. A file whose ``stats`` identity ``seen`` knows is not even
    read; the others are hashed first.
    """
    todo = [i for i, c in enumerate(candidates) if not c.reason]
    results: dict[int, Inspection] = {}
    if seen is not None and seen.by_sha1:
        sha1s = {i: seen.by_file.get(stats[i], "") for i in todo} if stats is not None else {}
        unknown = [i for i in todo if not sha1s.get(i)]
        hashes = pmap(_hash, [candidates[i].path for i in unknown], workers, desc="hash", unit="file", chunksize=64)
        sha1s.update(zip(unknown, hashes, strict=True))
        for i in todo:
            known = reuse(seen.by_sha1[sha1s[i]], min_size, max_pixels) if sha1s[i] in seen.by_sha1 else None
            if known is not None:
                results[i] = known
        todo = [i for i in todo if i not in results]
    found = pmap(Inspector(min_size, max_pixels), [candidates[i].path for i in todo], workers, desc="scan", unit="file")
    results.update(zip(todo, found, strict=True))
    return [results.get(i) for i in range(len(candidates))]


SCAN_COLUMNS = ["path", "sha1", "reason", "detail", "width", "height", "format", "mode"]


def scan_table(paths: Sequence[str], inspections: Sequence[Inspection | None]) -> pd.DataFrame:
    """One row per inspected file (``paths``: ``Accounting.paths``): what a later run needs to skip decoding the
    same bytes again."""
    rows = [(p, i.sha1, i.reason, i.detail, i.width, i.height, i.format, i.mode)
            for p, i in zip(paths, inspections, strict=True) if i is not None]
    return pd.DataFrame(rows, columns=SCAN_COLUMNS)


def identity_table(stats: Sequence[str], inspections: Sequence[Inspection | None]) -> pd.DataFrame:
    """file_stats identity -> sha1 of every hashed file: lets a later run on this machine skip reading it.

    Kept apart from ``scan_table``: identities differ per machine and per checkout, the scan does not.
    """
    rows = [(st, i.sha1) for st, i in zip(stats, inspections, strict=True) if st and i is not None and i.sha1]
    return pd.DataFrame(rows, columns=["file", "sha1"])


def read_scan(path: Path, identities: Path | None = None) -> Scan:
    """Earlier ``scan_table`` (and ``identity_table``) output; missing or unreadable means starting cold."""
    try:
        by_sha1 = {}
        for p, sha1, reason, detail, w, h, fmt, mode in _columns(path, SCAN_COLUMNS):
            # A message that names its own file would read wrong for a copy elsewhere: decode those again.
            if sha1 and not (detail and os.path.basename(p) in detail):
                by_sha1[sha1] = Inspection(reason, detail, sha1, int(w or 0), int(h or 0), fmt, mode)
    except _UNREADABLE:
        return Scan()
    by_file = {}
    if identities is not None:
        try:
            by_file = {f: s for f, s in _columns(identities, ["file", "sha1"]) if s in by_sha1}
        except _UNREADABLE:
            pass  # hashing every file again is slower, never wrong
    return Scan(by_sha1, by_file)


_UNREADABLE = (OSError, ValueError, IndexError, StopIteration, csv.Error)


def _columns(path: Path, names: Sequence[str]) -> list[list[str]]:
    """The named columns of a CSV file, row by row. The csv module, not pandas: iterating pandas' string
    columns cost 0.3 s per 20,000 rows, more than reading them."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        at = [header.index(name) for name in names]
        return [[row[i] for i in at] for row in reader]
