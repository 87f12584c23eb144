"""Find the candidate files of a data source, each with the class its layout gives it.

A source lists *every* file it finds, including ones that cannot be images (Thumbs.db, stray files): the prepare
stage accounts for each one, kept or rejected with a reason. New sources register in ``SOURCES``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kennel.core.errors import DataError
from kennel.data.synthetic import write_synthetic

log = logging.getLogger(__name__)




@dataclass(frozen=True)
class Candidate:
    path: Path
    label: str | None  # None: the layout gives this file no class, and ``reason`` says why
    reason: str = ""


def relatives(paths: Sequence[Path], root: Path) -> list[str]:
    """Each path as the reports write it: real path relative to ``root`` when inside it, else absolute.

    Each folder is resolved once (resolving every file's whole path took seconds at 20,000 files); a file that
    is itself a symlink is resolved in full, like ``Path.resolve``.
    """
    prefix = os.path.join(os.path.realpath(root), "")
    folders: dict[str, str] = {}
    out = []
    for path in paths:
        p = os.fspath(path)
        if os.path.islink(p):
            real = os.path.realpath(p)
        else:
            folder, name = os.path.split(p)  # a relative folder resolves against the working directory
            if folder not in folders:
                folders[folder] = os.path.realpath(folder or os.curdir)
            real = os.path.join(folders[folder], name)
        out.append(real[len(prefix):].replace(os.sep, "/") if real.startswith(prefix) else real)
    return out


def _files(folder: Path) -> list[Path]:
    """Every file and symlink under ``folder`` (symlinked folders are listed, not entered), sorted.

    ``os.scandir`` knows most entry types without a stat call per file, unlike ``Path.rglob`` + ``is_file``.
    """
    found, todo = [], [os.fspath(folder)]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                elif e.is_file() or e.is_symlink():
                    found.append(Path(e.path))
    return sorted(found)


def _require_dir(raw_dir: Path, layout: str) -> None:
    if not raw_dir.is_dir():
        raise DataError(f"data.raw_dir = {str(raw_dir)!r}: folder not found (expected {layout})")


def from_folder(raw_dir: Path, lowercase: bool = False, **_) -> list[Candidate]:
    """ImageFolder layout: ``raw_dir/<class>/**/<file>``; the class is the first folder level."""
    _require_dir(raw_dir, f"{raw_dir}/<class>/<image>")
    found, prefix = [], len(os.path.join(raw_dir, ""))
    for path in _files(raw_dir):
        parts = os.fspath(path)[prefix:].split(os.sep)  # _files joins onto raw_dir as given: no relative_to needed
        if len(parts) < 2 or parts[0].startswith("."):
            found.append(Candidate(path, None, "not in a class folder"))
        else:
            found.append(Candidate(path, parts[0].lower() if lowercase else parts[0]))
    if len({c.label for c in found if c.label}) < 2:
        raise DataError(f"{raw_dir}: found {len({c.label for c in found if c.label})} class folder(s) with files; "
                        "need at least 2 (<class>/<image>)")
    return found


def from_kaggle(raw_dir: Path, out_dir: Path, **_) -> list[Candidate]:
    """Kaggle dogs-vs-cats: ``cat.0.jpg``, ``dog.12.jpg`` (class = name before the first dot), or its train.zip."""
    if raw_dir.is_file() and raw_dir.suffix.lower() == ".zip":
        raw_dir = extract_zip(raw_dir, out_dir / "extracted")
    _require_dir(raw_dir, f"{raw_dir}/<class>.<n>.jpg or a .zip of them")
    found = []
    for path in _files(raw_dir):
        parts = path.name.split(".")
        if len(parts) >= 3 and parts[0]:
            found.append(Candidate(path, parts[0]))
        else:
            found.append(Candidate(path, None, "name is not <class>.<n>.<ext>"))
    return found


def from_petimages(raw_dir: Path, **_) -> list[Candidate]:
    """Microsoft PetImages: ``raw_dir/PetImages/{Cat,Dog}/N.jpg`` or ``raw_dir`` = PetImages; classes cat, dog."""
    inner = raw_dir / "PetImages"
    return from_folder(inner if inner.is_dir() else raw_dir, lowercase=True)


OXFORD_PETS_HOWTO = (
    "download https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz and annotations.tar.gz and extract "
    "both into {base} (giving {base}/images and {base}/annotations)"
)


def from_oxford_pets(raw_dir: Path, oxford_target: str = "binary-category", **_) -> list[Candidate]:
    """Oxford-IIIT Pet, downloaded by torchvision into ``raw_dir/oxford-iiit-pet`` when it is not there yet.

    ``binary-category``: cat / dog; ``category``: the 37 breeds. Files the annotations do not list are rejected.
    """
    base = raw_dir / "oxford-iiit-pet"
    if not ((base / "images").is_dir() and (base / "annotations").is_dir()):
        how_to = OXFORD_PETS_HOWTO.format(base=base)
        if os.environ.get("KENNEL_OFFLINE") == "1":
            raise DataError(f"Oxford-IIIT Pet not found in {base} and KENNEL_OFFLINE=1: {how_to}")
        from torchvision.datasets import OxfordIIITPet  # torch is heavy: import only when downloading

        try:
            OxfordIIITPet(str(raw_dir), split="trainval", download=True)
        except Exception as err:  # noqa: BLE001 - network errors come in many types
            raise DataError(f"Oxford-IIIT Pet not found in {base} and the download failed "
                            f"({type(err).__name__}: {err}): {how_to}") from None
    labels: dict[str, str] = {}
    for split in ("trainval", "test"):
        ann = base / "annotations" / f"{split}.txt"
        if not ann.is_file():
            raise DataError(f"{ann}: missing; {OXFORD_PETS_HOWTO.format(base=base)}")
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 4 or fields[2] not in ("1", "2"):
                raise DataError(f"{ann}:{n}: expected '<image id> <class id> <species 1|2> <breed id>', got {line!r}")
            image_id, species = fields[0], fields[2]
            breed = image_id.rsplit("_", 1)[0]
            labels[image_id] = ("cat", "dog")[int(species) - 1] if oxford_target == "binary-category" else breed
    found = []
    for path in _files(base / "images"):
        label = labels.get(path.stem) if path.suffix.lower() == ".jpg" else None
        found.append(Candidate(path, label, "" if label else "not listed in the annotations"))
    return found


def from_synthetic(raw_dir: Path, *, out_dir: Path, seed: int, per_class: int, **_) -> list[Candidate]:
    """The embedded default: draw the synthetic cat/dog set into ``out_dir`` (``raw_dir`` is not read)."""
    return [Candidate(p, label) for p, label in write_synthetic(out_dir / "images", per_class, seed)]


SOURCES: dict[str, Callable[..., list[Candidate]]] = {
    "synthetic": from_synthetic,
    "folder": from_folder,
    "kaggle": from_kaggle,
    "petimages": from_petimages,
    "oxford-pets": from_oxford_pets,
}


def find_images(source: str, raw_dir: Path, **options) -> list[Candidate]:
    try:
        finder = SOURCES[source]
    except KeyError:
        raise DataError(f"data.source = {source!r}: allowed: {' | '.join(SOURCES)}") from None
    return finder(Path(raw_dir), **options)


def extract_zip(zip_path: Path, dest: Path) -> Path:
    """Extract ``zip_path`` into ``dest`` after checking every entry stays inside it (no ../, absolute paths,
    drive letters or symlinks). A bad entry refuses the whole archive before anything is written."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{zip_path}: not a readable zip ({err})") from None
    with archive:
        for info in archive.infolist():
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]) or is_link:
                raise DataError(f"{zip_path}: entry {name!r} would land outside {dest}; refusing to extract")
        dest.mkdir(parents=True, exist_ok=True)
        archive.extractall(dest)
    log.info("extracted %s into %s", zip_path, dest)
    return dest
