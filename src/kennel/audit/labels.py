"""Suspected label errors: out-of-sample class probabilities from the pretrained embeddings, ranked by confident
learning (cleanlab).

Each image's probabilities come from a logistic regression fitted on the other folds, so no image votes on its own
label. cleanlab's ``find_label_issues`` flags the images whose given label those probabilities contradict beyond
the noise rates it estimates per class pair; the score is the probability of the given label (self-confidence),
lowest = most suspect. Every image is ranked, the flagged ones first: a flip cleanlab does not flag still has its
place near the top of the review. Test images are judged too: a wrong label there misreports accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.data.manifest import write_csv

log = logging.getLogger(__name__)

FOLDS = 5
# Inverse regularisation strength on L2-normalised embeddings, measured on 1,400 real photos with 3 % of labels
# flipped (benchmarks/RESULTS.md, "Label issues"): share of the flips among the top (number flipped) suspects
# 0.91 at C = 1, 0.93-0.94 at 3 and 10, 0.90 at 30, 0.85 at 100.
C = 10.0
COLUMNS = ["index", "given", "suggested", "given_label", "suggested_label", "score", "is_issue", "rank"]
CSV_COLUMNS = ["rank", "path", "sha1", "given_label", "suggested_label", "score", "flagged", "split"]


def out_of_sample_probabilities(
    embeddings: np.ndarray, labels: np.ndarray, n_classes: int, *, folds: int, seed: int, C: float = C,
) -> np.ndarray:
    """N x ``n_classes`` probabilities, each row from a model that never saw that row (stratified k-fold).

    Every class needs at least ``folds`` members, so that every training fold has all classes.
    """
    # scikit-learn (1 s to import) only when labels are checked: never without pretrained features
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import normalize

    x = normalize(np.asarray(embeddings, dtype=np.float32))  # cosine geometry: what pretrained embeddings mean
    probs = np.zeros((len(labels), n_classes))
    for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
        model = LogisticRegression(C=C, max_iter=2000).fit(x[train], labels[train])
        probs[np.ix_(held, model.classes_)] = model.predict_proba(x[held])
    return probs


def label_issues(
    embeddings: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, folds: int = FOLDS, seed: int,
    C: float = C,
) -> pd.DataFrame:
    """One row per image (COLUMNS), most suspect first; ``index`` is the row of ``embeddings``/``labels``.

    ``labels`` are class indices into ``classes``. ``suggested`` is the most probable class, ``score`` the
    probability of the given label (NaN where not judged), ``is_issue`` cleanlab's verdict, ``rank`` 1 = most
    suspect: the flagged images first, then the others, each by score. A class with fewer than 2 images cannot be
    judged out of sample: its images keep their label, score
    NaN, and rank last; a class with fewer than ``folds`` images lowers the number of folds. Deterministic for a
    given ``seed``.
    """
    from cleanlab.filter import find_label_issues  # imported here: cleanlab pulls in much that the rest does not
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(f"embeddings {embeddings.shape} and labels ({len(labels)}) must be N x D and N")
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
        raise ValueError(f"labels must be class indices in [0, {len(classes)})")
    counts = np.bincount(labels, minlength=len(classes))
    judged = np.flatnonzero(counts >= 2)
    too_small = [classes[k] for k in np.flatnonzero((counts > 0) & (counts < 2))]
    if too_small:
        log.info("label issues: class(es) %s have a single image and are not judged", ", ".join(too_small))
    n = len(labels)
    suggested, score, is_issue = labels.copy(), np.full(n, np.nan), np.zeros(n, dtype=bool)
    if len(judged) < 2:
        log.warning("label issues: %d class(es) with 2 or more images; need 2 to judge any label", len(judged))
    else:
        rows = np.flatnonzero(np.isin(labels, judged))
        given = np.searchsorted(judged, labels[rows])  # compact indices 0..len(judged)-1
        k = int(min(folds, counts[judged].min()))
        if k < folds:
            smallest = classes[judged[counts[judged].argmin()]]
            log.info("label issues: %d folds instead of %d: class %r has %d images", k, folds, smallest, k)
        probs = out_of_sample_probabilities(embeddings[rows], given, len(judged), folds=k, seed=seed, C=C)
        suggested[rows] = judged[probs.argmax(axis=1)]
        score[rows] = get_label_quality_scores(given, probs, method="self_confidence")
        is_issue[rows] = find_label_issues(given, probs, n_jobs=1)  # n_jobs=1: no worker processes, same result
    # flagged first (the data contradicts their label), then the rest by score: every image has a place to review
    order = np.lexsort((np.arange(n), np.nan_to_num(score, nan=np.inf), ~is_issue))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    names = np.asarray(classes, dtype=object)
    frame = pd.DataFrame({"index": np.arange(n), "given": labels, "suggested": suggested,
                          "given_label": names[labels] if n else [], "suggested_label": names[suggested] if n else [],
                          "score": score, "is_issue": is_issue, "rank": rank}, columns=COLUMNS)
    log.info("label issues: %d of %d images flagged", int(is_issue.sum()), n)
    return frame.iloc[order].reset_index(drop=True)


def suspects(issues: pd.DataFrame, images: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """Every image (the first ``top``), most suspect first, as CSV_COLUMNS: the ones cleanlab flags, then the rest by
    score, so an error cleanlab misses still has a place in the queue.

    ``images`` row i describes embeddings row i and has ``path``, ``sha1`` and ``split`` (the manifest, whose
    order the resize index keeps).
    """
    ranked = issues.sort_values("rank")
    if top is not None:
        ranked = ranked.head(top)
    picked = images.iloc[ranked["index"].to_numpy()]
    return pd.DataFrame({
        "rank": ranked["rank"].to_numpy(), "path": picked["path"].to_numpy(), "sha1": picked["sha1"].to_numpy(),
        "given_label": ranked["given_label"].to_numpy(), "suggested_label": ranked["suggested_label"].to_numpy(),
        "score": ranked["score"].round(4).to_numpy(), "flagged": ranked["is_issue"].to_numpy(),
        "split": picked["split"].to_numpy(),
    }, columns=CSV_COLUMNS)


def flagged(table: pd.DataFrame) -> np.ndarray:
    """cleanlab's verdict per row of a ``suspects`` table, also as read back from the CSV as text."""
    return table["flagged"].astype(str).str.lower().isin(["true", "1"]).to_numpy()


def write_label_issues(issues: pd.DataFrame, images: pd.DataFrame, path: Path, top: int | None = None) -> pd.DataFrame:
    """``suspects(issues, images, top)`` written to ``path`` (whole or not at all); returns the table."""
    table = suspects(issues, images, top)
    write_csv(table, Path(path))
    return table
