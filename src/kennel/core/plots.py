"""Figure helpers shared by the data report and the evaluation: matplotlib's ``Figure`` without pyplot
(no figure manager, no GUI backend, 0.3 s less to import), saved as PNG."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no figure manager, no GUI backend, 0.3 s less to import
from matplotlib.patches import Rectangle

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
    return save_figure(fig, path, layout=False)


def save_figure(fig, path: Path, layout: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path)
    return path


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], dpi: int, **kwargs):
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **kwargs)
