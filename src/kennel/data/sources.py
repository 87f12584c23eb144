"""Find the images of a data source: a list of (path, label). New sources register in ``SOURCES``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from kennel.data.synthetic import write_synthetic

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

Entries = list[tuple[Path, str]]


class DataError(ValueError):
    """The data cannot be used as it is; the message names the folder, file or class."""


def from_folder(raw_dir: Path, **_) -> Entries:
    """ImageFolder layout: ``raw_dir/<class>/**/<image>``; the class is the first folder level."""
    if not raw_dir.is_dir():
        raise DataError(f"data.raw_dir = {str(raw_dir)!r}: folder not found (expected {raw_dir}/<class>/<image>)")
    entries: Entries = []
    class_dirs = sorted(p for p in raw_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if len(images) < len(files):
            log.info("%s: skipped %d files without an image suffix", class_dir, len(files) - len(images))
        if not images:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"{class_dir}: class {class_dir.name!r} has no images ({suffixes})")
        entries += [(p, class_dir.name) for p in images]
    if len(class_dirs) < 2:
        raise DataError(f"{raw_dir}: found {len(class_dirs)} class folder(s); need at least 2 (<class>/<image>)")
    return entries


def from_synthetic(raw_dir: Path, *, out_dir: Path, seed: int, per_class: int, **_) -> Entries:
    """The embedded default: draw the synthetic cat/dog set into ``out_dir`` (``raw_dir`` is not read)."""
    return write_synthetic(out_dir / "images", per_class, seed)


SOURCES: dict[str, Callable[..., Entries]] = {"folder": from_folder, "synthetic": from_synthetic}


def find_images(source: str, raw_dir: Path, **options) -> Entries:
    try:
        finder = SOURCES[source]
    except KeyError:
        raise DataError(f"data.source = {source!r}: allowed: {' | '.join(SOURCES)}") from None
    return finder(Path(raw_dir), **options)
