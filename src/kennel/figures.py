"""PNG figures of results and data: matrices, curves, reliability, image grids (matplotlib, no display needed)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no figure manager, no GUI backend, 0.3 s less to import
from matplotlib.patches import Rectangle

if TYPE_CHECKING:
    from kennel.metrics import Curves


def confusion_png(cm: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    fig, ax = _subplots(figsize=(1.2 + 0.8 * len(classes), 1 + 0.8 * len(classes)), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_title("confusion matrix (test)")
    return _save(fig, path)


def roc_png(curves: Sequence[Curves], path: Path) -> Path:
    """One ROC line per curve (the positive class, or each class against the rest)."""
    fig, ax = _subplots(figsize=(4.5, 4.5), dpi=100)
    for c in curves:
        ax.plot(c.roc["fpr"], c.roc["tpr"], label=f"{_label(c, curves)}AUC = {c.roc_auc:.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (test)" if len(curves) < 2 else "ROC, one class vs the rest (test)")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def pr_png(curves: Sequence[Curves], path: Path) -> Path:
    """One precision-recall line per curve, with its average precision."""
    fig, ax = _subplots(figsize=(4.5, 4.5), dpi=100)
    for c in curves:
        ax.step(c.pr["recall"], c.pr["precision"], where="pre",  # recall rises along the table
                label=f"{_label(c, curves)}AP = {c.average_precision:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_title("precision-recall (test)" if len(curves) < 2 else "precision-recall, one vs rest (test)")
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def _label(c: Curves, curves: Sequence[Curves]) -> str:
    return f"{c.name}: " if len(curves) > 1 else f"positive class {c.name}: "


def reliability_png(table: pd.DataFrame, ece: float, bins: int, path: Path) -> Path:
    """Accuracy against confidence per bin (bars), the diagonal a calibrated model sits on, images per bin."""
    fig, (ax, hist) = _subplots(2, 1, figsize=(4.5, 5.5), dpi=100, sharex=True,
                                gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / bins
    ax.bar(table["bin_low"], table["accuracy"], width=width, align="edge", edgecolor="black", label="accuracy")
    ax.plot(table["bin_low"] + width / 2, table["confidence"], "o", color="tab:red", label="mean confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"reliability (test): ECE = {ece:.3f}")
    ax.legend(loc="upper left", fontsize="small")
    hist.bar(table["bin_low"], table["count"], width=width, align="edge", color="grey", edgecolor="black")
    hist.set_xlabel("confidence (probability of the predicted class)")
    hist.set_ylabel("images")
    hist.set_xlim(0, 1)
    return _save(fig, path)


PANEL_W, PANEL_H = 2.3, 2.2  # inches per image_grid panel, caption not included


def image_grid(
    images: Sequence[np.ndarray | None], captions: Sequence[str], path: Path, title: str, cols: int = 4,
    heat: Sequence[np.ndarray] | None = None, colors: Sequence[str] | None = None,
) -> Path:
    """Thumbnails (uint8 3 x H x W or H x W x 3; None draws an empty panel) with a caption each, in order,
    row by row; ``heat`` (H x W in [0, 1]) is overlaid as a heatmap; ``colors`` colour the captions."""
    n = max(len(images), 1)
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    caption_h = 0.16 * max((c.count("\n") + 1 for c in captions), default=1)  # inches of caption over a panel
    title = textwrap.fill(title, int(12 * PANEL_W * cols))  # ~12 characters per inch at 10 pt
    top = 0.25 + 0.18 * (title.count("\n") + 1)
    width, height = PANEL_W * cols, top + rows * (PANEL_H + caption_h) + 0.1
    fig = Figure(figsize=(width, height), dpi=100)
    # Panels placed by hand, captions as plain text: a layout engine or axes titles measure every text's
    # extent and took most of the drawing time (0.9 s -> 0.35 s for two rows of eight).
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        ax = fig.add_axes(((c * PANEL_W + 0.05) / width, 1 - (top + (r + 1) * (PANEL_H + caption_h)) / height,
                           (PANEL_W - 0.1) / width, PANEL_H / height))
        ax.set_axis_off()
        ax.set_anchor("N")  # an image narrower than its panel hangs from the top, under its caption
        if i >= len(images):
            if not images:
                ax.text(0.5, 0.5, "none", ha="center", va="center", color="0.4", transform=ax.transAxes)
            continue
        img = images[i]
        if img is None:
            ax.add_patch(Rectangle((0, 0), 1, 1, color="0.9", transform=ax.transAxes))
            ax.text(0.5, 0.5, "no image", ha="center", va="center", color="0.4", transform=ax.transAxes)
        else:
            img = img.transpose(1, 2, 0) if img.ndim == 3 and img.shape[0] == 3 else img
            ax.imshow(img)
            if heat is not None:
                ax.imshow(heat[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=(-0.5, img.shape[1] - 0.5,
                                                                                img.shape[0] - 0.5, -0.5))
        ax.text(0, 1.01, captions[i], fontsize=7.5, ha="left", va="bottom", transform=ax.transAxes,
                color=colors[i] if colors is not None else "black")
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    return _save(fig, path, layout=False)


def sizes_png(widths: np.ndarray, heights: np.ndarray, path: Path) -> Path:
    """Histograms of width and height (pixels) and of the aspect ratio width / height of the kept images."""
    fig, (ax, ratio) = _subplots(1, 2, figsize=(9, 3.6), dpi=100)
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
    return _save(fig, path, layout=False)


def class_counts_png(counts: pd.DataFrame, path: Path) -> Path:
    """Images per class and split (stacked bars), with the rejected count beside each class."""
    fig, ax = _subplots(figsize=(6, 1.2 + 0.45 * len(counts)), dpi=100)
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
    return _save(fig, path)


def _save(fig, path: Path, layout: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path)
    return path


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], dpi: int, **kwargs):
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **kwargs)
