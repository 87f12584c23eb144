"""The data look's figures: image sizes and class counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kennel.core.plots import save_figure, subplots


def sizes_png(widths: np.ndarray, heights: np.ndarray, path: Path) -> Path:
    """Histograms of width and height (pixels) and of the aspect ratio width / height of the kept images."""
    fig, (ax, ratio) = subplots(1, 2, figsize=(9, 3.6), dpi=100)
    if len(widths):
        bins = np.histogram_bin_edges(np.r_[widths, heights], bins=30)
        # one filled outline per histogram, not a patch per bar: a third of the drawing time
        ax.hist(widths, bins=bins, alpha=0.6, label="width", histtype="stepfilled")
        ax.hist(heights, bins=bins, alpha=0.6, label="height", histtype="stepfilled")
        ratio.hist(widths / heights, bins=30, color="tab:green", histtype="stepfilled")
        ax.legend(fontsize="small")
    ax.set_xlabel("pixels")
    ax.set_ylabel("images")
    ax.set_title(f"image sizes ({len(widths)} kept images)")
    ratio.axvline(1.0, color="grey", linestyle="--")
    ratio.set_xlabel("aspect ratio (width / height)")
    ratio.set_title("aspect ratios")
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.15, top=0.9, wspace=0.25)  # fixed texts: no tight_layout
    return save_figure(fig, path, layout=False)


def class_counts_png(counts: pd.DataFrame, path: Path) -> Path:
    """Images per class and split (stacked bars), with the rejected count beside each class."""
    fig, ax = subplots(figsize=(6, 1.2 + 0.45 * len(counts)), dpi=100)
    y = np.arange(len(counts))
    left = np.zeros(len(counts))
    for split in ("train", "val", "test"):
        ax.barh(y, counts[split], left=left, label=split)
        left += counts[split].to_numpy()
    for i, (kept, rejected) in enumerate(zip(counts["kept"], counts["rejected"], strict=True)):
        ax.text(left[i], i, f" {kept} kept, {rejected} rejected", va="center", fontsize=8)
    ax.set_yticks(y, counts["label"])
    ax.invert_yaxis()
    ax.set_xlim(0, max(left.max(), 1) * 1.45)
    ax.set_xlabel("images")
    ax.set_title("kept images per class and split")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return save_figure(fig, path)
