"""A grid of the top suspected label errors, each captioned with its given and suggested label: what a reviewer
looks at before writing data/exclude.csv and data/relabel.csv."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.audit.labels import flagged
from kennel.core.plots import image_grid
from kennel.data.report import thumbnail

TOP = 16  # panels: two rows of eight, like the other grids
FLAGGED = "tab:red"


def captions(table: pd.DataFrame) -> list[str]:
    """given -> suggested and the score (probability of the given label), then split and file name."""
    return [f"{r.given_label} \u2192 {r.suggested_label}  ({r.score:.2f})\n{r.split}  {Path(r.path).name[:26]}"
            for r in table.itertuples()]


def label_issues_png(
    table: pd.DataFrame, path: Path, *, images: Sequence[np.ndarray | None] | None = None, root: Path = Path("."),
    max_pixels: int | None = None, top: int = TOP, title: str = "",
) -> Path:
    """The first ``top`` rows of ``table`` (``kennel.audit.labels.suspects``: most suspect first, the flagged
    ones before the rest) as a grid, the flagged ones' captions in red.

    ``images`` (uint8 3 x H x W or H x W x 3, aligned with the table's rows; e.g. the resized rows) are drawn when
    given, else a thumbnail of each file ``root / path`` (None where it cannot be read: the panel says so).
    """
    shown = table.head(top)
    pictures = list(images[: len(shown)]) if images is not None else [thumbnail(root / p, max_pixels)
                                                                       for p in shown["path"]]
    marked = flagged(shown)
    if not title:
        title = (f"Suspected label errors: the {len(shown)} most suspect of {len(table)} images; "
                 f"{int(flagged(table).sum())} flagged by cleanlab (red), then the next by score (given \u2192 "
                 "suggested label, probability of the given label)" if len(table)
                 else "Suspected label errors: no images judged")
    return image_grid(pictures, captions(shown), path, title, cols=8,
                      colors=[FLAGGED if m else "black" for m in marked])
