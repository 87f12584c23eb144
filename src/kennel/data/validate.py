"""Decide for one file whether it is a usable image, by decoding all of it, and why not if it is not."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from kennel.data.images import DecompressionBomb, open_checked, to_rgb
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
        img = open_checked(path, max_pixels)
    except DecompressionBomb as err:
        return Inspection(BOMB, str(err), sha1)
    except UnidentifiedImageError:
        return Inspection(NOT_IMAGE, f"starts with {head!r}", sha1)
    except (OSError, SyntaxError, ValueError) as err:
        return Inspection(CORRUPT, f"{type(err).__name__}: {err}", sha1)
    with img:
        w, h, fmt, mode = img.width, img.height, img.format or "", img.mode
        if min(w, h) < min_size:
            return Inspection(TOO_SMALL, f"{w}x{h}, shorter side < data.min_size {min_size}", sha1, w, h, fmt, mode)
        try:
            img.seek(0)  # animated images: the first frame is what training sees
            img.load()
            to_rgb(img)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            return Inspection(CORRUPT, f"{type(err).__name__}: {err}", sha1, w, h, fmt, mode)
    return Inspection("", "", sha1, w, h, fmt, mode)


def _sha1_and_head(path: Path) -> tuple[str, bytes]:
    """Content hash read in chunks (a stray multi-GB file must not be loaded whole) and the first bytes."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        head = f.read(16)
        h.update(head)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest(), head


def inspect_all(
    candidates: Sequence[Candidate], min_size: int, max_pixels: int, workers: int | str = 1
) -> list[Inspection | None]:
    """Inspect every candidate the layout did not already reject (None for those), in ``workers`` processes."""
    todo = [i for i, c in enumerate(candidates) if not c.reason]
    found = pmap(Inspector(min_size, max_pixels), [candidates[i].path for i in todo], workers, desc="scan", unit="file")
    results = dict(zip(todo, found, strict=True))
    return [results.get(i) for i in range(len(candidates))]
