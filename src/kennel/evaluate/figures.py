"""The evaluation's figures: confusion matrix, per-class recall and precision, ROC, precision-recall and
reliability."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.core.plots import save_figure, subplots
from kennel.evaluate.metrics import Curves


def confusion_png(cm: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Counts, coloured by the share of each true class (row): a rare class's errors show as strongly as a
    common one's, and each cell reads "count" over "share of the row"."""
    totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)
    n = len(classes)
    fig, ax = subplots(figsize=(max(3.6, 1.6 + 0.8 * n), 1.4 + 0.8 * n), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), [f"{c} ({int(t)})" for c, t in zip(classes, totals[:, 0], strict=True)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual (test images)")
    for (i, j), v in np.ndenumerate(cm):
        if v or i == j:
            ax.text(j, i, f"{v}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8 if n > 6 else 10,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_title("confusion matrix (test)\nshaded by each actual class's share", fontsize=10)
    return save_figure(fig, path)


def per_class_png(per_class: dict[str, dict[str, float]], path: Path) -> Path:
    """Recall and precision of every class, worst recall first: which classes a model fails, at a glance."""
    order = sorted(per_class, key=lambda name: (per_class[name]["recall"], name))
    y = np.arange(len(order))
    fig, ax = subplots(figsize=(6.5, 1.2 + 0.35 * len(order)), dpi=100)
    ax.barh(y - 0.2, [per_class[c]["recall"] for c in order], height=0.4, label="recall", color="tab:blue")
    ax.barh(y + 0.2, [per_class[c]["precision"] for c in order], height=0.4, label="precision", color="tab:orange")
    ax.set_yticks(y, [f"{c} ({per_class[c]['support']})" for c in order])
    ax.invert_yaxis()  # the worst at the top
    ax.set_xlim(0, 1.32)  # room on the right for the legend, clear of the bars
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("on the test split (test images per class in brackets)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("per class, worst recall first")
    return save_figure(fig, path)


def roc_png(curves: Sequence[Curves], path: Path) -> Path:
    """One ROC line per curve (the positive class, or each class against the rest)."""
    fig, ax = subplots(figsize=(4.5, 4.5), dpi=100)
    for c in curves:
        ax.plot(c.roc["fpr"], c.roc["tpr"], label=f"{_label(c, curves)}AUC = {c.roc_auc:.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (test)" if len(curves) < 2 else "ROC, one class vs the rest (test)")
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)


def pr_png(curves: Sequence[Curves], path: Path) -> Path:
    """One precision-recall line per curve, with its average precision."""
    fig, ax = subplots(figsize=(4.5, 4.5), dpi=100)
    for c in curves:
        ax.step(c.pr["recall"], c.pr["precision"], where="pre",  # recall rises along the table
                label=f"{_label(c, curves)}AP = {c.average_precision:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_title("precision-recall (test)" if len(curves) < 2 else "precision-recall, one vs rest (test)")
    ax.legend(loc="lower left", fontsize="small")
    return save_figure(fig, path)


def _label(c: Curves, curves: Sequence[Curves]) -> str:
    return f"{c.name}: " if len(curves) > 1 else f"positive class {c.name}: "


def reliability_png(table: pd.DataFrame, ece: float, bins: int, path: Path) -> Path:
    """Accuracy against confidence per bin (bars), the diagonal a calibrated model sits on, images per bin."""
    fig, (ax, hist) = subplots(2, 1, figsize=(4.5, 5.5), dpi=100, sharex=True,
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
    return save_figure(fig, path)
