"""Images that belong to no class: far, in the pretrained embeddings, from the centre of every class.

Each class's centre is the normalised mean of its members' L2-normalised embeddings; an image's distance to a class
is 1 - cosine to that centre, divided by the class's own median distance (a tight class such as X-rays and a
varied one such as pet photos are then on one scale), and its score is the distance to the nearest class: 1 is a
typical member, the most outlying images score highest. A class centre, not an image's nearest neighbours: a few
stray images of one kind (scans among photos) are each other's neighbours, but stay far from every class's centre.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

COLUMNS = ["index", "score", "nearest_class", "rank"]
CSV_COLUMNS = ["rank", "path", "sha1", "label", "nearest_class", "score", "split"]


def outlier_scores(embeddings: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per image (COLUMNS), most outlying first; ``index`` is the row of ``embeddings``/``labels``
    (class indices into ``classes``), ``nearest_class`` the class whose centre is nearest in its own scale."""
    from sklearn.preprocessing import normalize  # only with pretrained features (1 s to import)

    x = normalize(np.asarray(embeddings, dtype=np.float32))
    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    if not len(x) or not len(present):
        return pd.DataFrame({c: [] for c in COLUMNS})
    centres = normalize(np.stack([x[labels == c].mean(axis=0) for c in present]))
    distance = 1 - x @ centres.T  # N x classes present
    typical = np.array([np.median(distance[labels == c, k]) for k, c in enumerate(present)])
    scaled = distance / np.maximum(typical, 1e-6)
    nearest = scaled.argmin(axis=1)
    score = scaled[np.arange(len(x)), nearest]
    order = np.lexsort((np.arange(len(x)), -score))
    rank = np.empty(len(x), dtype=np.int64)
    rank[order] = np.arange(1, len(x) + 1)
    names = np.asarray(classes, dtype=object)
    frame = pd.DataFrame({"index": np.arange(len(x)), "score": score.astype(np.float64),
                          "nearest_class": names[present[nearest]], "rank": rank}, columns=COLUMNS)
    return frame.iloc[order].reset_index(drop=True)


def outlier_table(ranked: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """``outlier_scores`` as CSV_COLUMNS; ``images`` row i describes embeddings row i (path, sha1, label, split)."""
    picked = images.iloc[ranked["index"].to_numpy()]
    return pd.DataFrame({
        "rank": ranked["rank"].to_numpy(), "path": picked["path"].to_numpy(), "sha1": picked["sha1"].to_numpy(),
        "label": picked["label"].to_numpy(), "nearest_class": ranked["nearest_class"].to_numpy(),
        "score": ranked["score"].round(4).to_numpy(), "split": picked["split"].to_numpy(),
    }, columns=CSV_COLUMNS)
