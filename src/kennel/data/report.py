"""A look at the data: sample thumbnails per class, image sizes and aspect ratios, class counts per split, and a
sample of the rejected files with their reasons. Written by prepare next to its other reports."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.core.plots import image_grid
from kennel.data.figures import class_counts_png, sizes_png
from kennel.data.images import open_checked, to_rgb
from kennel.data.manifest import SPLITS

SAMPLES_PER_CLASS = 8
REJECTED_SAMPLES = 16
THUMB = 128  # pixels, longer side
COUNTS_FILE = "class_counts.csv"
DATA_FIGURES = {"samples.png": "samples per class", "sizes.png": "image sizes", "class_counts.png": "class counts",
           "rejected.png": "rejected files"}


def class_counts(summary: Mapping) -> pd.DataFrame:
    """One row per class named by the data (kept or not): found, kept, rejected, and kept per split."""
    rows = [{"label": label, **{k: c[k] for k in ("found", "kept", "rejected", *SPLITS)}}
            for label, c in summary["per_class"].items()]
    return pd.DataFrame(rows, columns=["label", "found", "kept", "rejected", *SPLITS])


def write_data_report(
    manifest: pd.DataFrame, rejects: pd.DataFrame, summary: Mapping, root: Path, out_dir: Path, seed: int,
    max_pixels: int,
) -> list[Path]:
    """Write the class counts table and the four figures into ``out_dir`` (emptied first); returns the files."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    counts = class_counts(summary)
    counts.to_csv(out_dir / COUNTS_FILE, index=False)
    rng = np.random.default_rng(seed)

    images, captions = [], []
    for label, group in manifest.groupby("label", sort=True):
        picked = group.iloc[np.sort(rng.permutation(len(group))[:SAMPLES_PER_CLASS])]
        for path, w, h in zip(picked["path"], picked["width"], picked["height"], strict=True):
            images.append(thumbnail(root / path, max_pixels))
            captions.append(f"{label}\n{Path(path).name[:26]}  {w}x{h}")
    cols = min(SAMPLES_PER_CLASS, max(manifest["label"].value_counts().max(), 1)) if len(manifest) else 1
    files = [
        out_dir / COUNTS_FILE,
        image_grid(images, captions, out_dir / "samples.png", "Kept images: a random sample per class (one row each)",
                   cols=cols),
        sizes_png(manifest["width"].astype(float).to_numpy(), manifest["height"].astype(float).to_numpy(),
                  out_dir / "sizes.png"),
        class_counts_png(counts, out_dir / "class_counts.png"),
    ]
    sample = sample_rejects(rejects, REJECTED_SAMPLES)
    files.append(image_grid(
        [thumbnail(root / p, max_pixels) for p in sample["path"]],
        [f"{r.reason}\n{Path(r.path).name[:26]}\n{str(r.detail)[:30]}" for r in sample.itertuples()],
        out_dir / "rejected.png",
        f"Rejected: {len(sample)} of {len(rejects)} files, every reason shown" if len(rejects)
        else "No file was rejected",
    ))
    return files


def sample_rejects(rejects: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to ``n`` rejects taken in turn from each reason, so a rare reason is not crowded out by a common one."""
    groups = [g for _, g in rejects.groupby("reason", sort=True)]
    taken, depth = [], 0
    while len(taken) < n and any(depth < len(g) for g in groups):
        taken += [g.iloc[depth] for g in groups if depth < len(g)][: n - len(taken)]
        depth += 1
    return pd.DataFrame(taken, columns=rejects.columns)


def thumbnail(path: Path, max_pixels: int) -> np.ndarray | None:
    """A small RGB copy of an image file, or None where it cannot be decoded (the panel says so)."""
    try:
        with open_checked(path, max_pixels) as img:
            img.draft("RGB", (THUMB, THUMB))  # JPEG: decode at reduced scale, much faster for large photos
            rgb = to_rgb(img)
            rgb.thumbnail((THUMB, THUMB))
            return np.asarray(rgb)
    except Exception:  # noqa: BLE001 - rejected files are broken in every way; the panel shows "no image"
        return None
