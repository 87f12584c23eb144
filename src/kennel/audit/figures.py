"""The near-copies to look at: the most similar pair of each group, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kennel.core.plots import image_grid

LEAK, CONFLICT = "tab:orange", "tab:red"
OUTLIERS_SHOWN = 16  # panels: two rows of eight, like the label grid


def pair_figure(pairs: pd.DataFrame, groups: np.ndarray, table: pd.DataFrame, images, paths: list[str],
                path: Path, count: int, measure: str) -> Path:
    """``count`` groups' best pairs (``pairs`` most similar first; ``images[i]`` uint8 3 x S x S of position i),
    two pairs per row; captions name the file, label and split; red: labels differ, orange: splits differ."""
    best = pairs.assign(group=groups[pairs["a"].to_numpy()]).drop_duplicates("group").head(count)
    hash_split = dict(zip(table["path"], table["hash_split"], strict=True))
    pictures, captions, colors = [], [], []
    for a, b, sim, group in best[["a", "b", "similarity", "group"]].itertuples(index=False):
        members = table[table["group"] == group]
        label = dict(zip(members["path"], members["label"], strict=True))
        colour = (CONFLICT if members["label"].nunique() > 1
                  else LEAK if members["hash_split"].nunique() > 1 else "black")
        for i in (a, b):
            pictures.append(np.asarray(images[int(i)]))
            name = paths[i]
            captions.append(f"group {group}  {measure} {sim:.3f}\n{Path(name).name[:30]}\n"
                            f"{label[name]}  {hash_split[name]}")
            colors.append(colour)
    title = (f"Near-copies: the most similar pair of {len(best)} of {int(groups.max())} groups, most similar first "
             f"(captions: group, {measure}, file, label, hash split; red: labels differ, orange: splits differ)"
             if len(best) else f"No near-copies found among {len(groups)} images ({measure})")
    return image_grid(pictures, captions, path, title, cols=4, colors=colors)


def outlier_figure(table: pd.DataFrame, images, path: Path, count: int = OUTLIERS_SHOWN, title: str = "") -> Path:
    """The first ``count`` rows of the outlier table (most outlying first; ``images`` aligned with its rows) as a
    grid: score, given label and the nearest class's centre, file."""
    shown = table.head(count)
    captions = [f"{r.score:.2f}  {r.label} (nearest {r.nearest_class})\n{Path(r.path).name[:30]}"
                for r in shown.itertuples()]
    title = title or (f"Outliers: the {len(shown)} of {len(table)} images farthest from every class's centre in the "
             "pretrained embeddings (score: distance to the nearest class in its own scale, 1 = a typical member)"
             if len(table) else "Outliers: no images judged")
    return image_grid(list(images[: len(shown)]), captions, path, title, cols=8)
