"""The manifest: one row per image (path, label, split, sha1), with deterministic stratified splits."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from kennel.data.sources import DataError

COLUMNS = ["path", "label", "split", "sha1"]
SPLITS = ("train", "val", "test")


def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(
    entries: Iterable[tuple[Path, str]], root: Path, val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """Rows for ``entries`` with paths relative to ``root`` where possible (so copies of the repo still work)."""
    rows = [(_relative(Path(p), root), label, "", file_sha1(Path(p))) for p, label in entries]
    df = pd.DataFrame(rows, columns=COLUMNS)
    return assign_splits(df, val_fraction, test_fraction, seed)


def assign_splits(df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Per class, order images by hash(seed, content) and cut test, val, train off that order.

    The order depends only on file contents and the seed, never on listing order, so the split is the same on
    every machine; cutting per class keeps class proportions equal in every split (stratified).
    """
    df = df.copy()
    key = df["sha1"].map(lambda sha: hashlib.sha1(f"{seed}:{sha}".encode()).hexdigest())
    df["split"] = "train"
    for label, idx in df.groupby("label").groups.items():
        ordered = key.loc[idx].sort_values(kind="stable").index
        n = len(ordered)
        n_test, n_val = round(n * test_fraction), round(n * val_fraction)
        if n - n_test - n_val < 1:
            raise DataError(f"class {label!r} has {n} images: too few to leave any for training after val/test")
        df.loc[ordered[:n_test], "split"] = "test"
        df.loc[ordered[n_test : n_test + n_val], "split"] = "val"
    return df.sort_values(["split", "label", "path"], kind="stable").reset_index(drop=True)


def write_manifest(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def read_manifest(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: manifest not found; run the prepare stage first (dvc repro prepare)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise DataError(f"{path}: unknown split value(s) {bad}; allowed: {', '.join(SPLITS)}")
    return df


def class_names(df: pd.DataFrame) -> list[str]:
    """Class index i is the i-th label in sorted order, fixed for the life of a dataset."""
    return sorted(df["label"].unique())


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())
