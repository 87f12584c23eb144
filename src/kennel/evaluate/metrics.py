"""Classification metrics on plain arrays, computed with scikit-learn: accuracy, per-class P/R/F1, confusion
matrix, ROC and precision-recall curves (one-vs-rest beyond two classes), and calibration."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``correct`` / ``n``: sound near 0 and 1 and on small test
    splits, where one image moves accuracy by 1 / n (NaN, NaN for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def accuracy_interval(metrics) -> tuple[int, float, float]:
    """(test images, 95 % interval low, high) of the accuracy in ``metrics`` (as classification_metrics gives it):
    the accuracy is a share of the per-class supports, so it gives back the number of correct images."""
    n = int(sum(r["support"] for r in metrics["per_class"].values()))
    return (n, *wilson_interval(round(metrics["accuracy"] * n), n))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return skm.confusion_matrix(y_true, y_pred, labels=range(num_classes)).astype(np.int64)


def per_class(cm: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class; 0 where a ratio has no denominator."""
    # sklearn scores label arrays, not a matrix: expand the counts back into (true, predicted) pairs.
    true, pred = np.nonzero(cm)
    weights = cm[true, pred]
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        np.repeat(true, weights), np.repeat(pred, weights), labels=range(len(classes)), zero_division=0.0
    )
    return {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(classes)
    }


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for a binary problem, one point per distinct score, starting at (0, 0)."""
    y_true = np.asarray(y_true).astype(bool)
    if y_true.all() or not y_true.any():
        raise ValueError("ROC needs both classes among the labels")
    return skm.roc_curve(y_true, score, drop_intermediate=False)


def pr_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, thresholds), from the highest threshold down; precision ends at 1 where recall is 0."""
    y_true = np.asarray(y_true).astype(bool)
    if not y_true.any():
        raise ValueError("a precision-recall curve needs positives among the labels")
    precision, recall, thresholds = skm.precision_recall_curve(y_true, score, drop_intermediate=False)
    # sklearn lists points from low to high threshold, with a final point (recall 0) that has none.
    return recall[::-1], precision[::-1], np.r_[np.inf, thresholds[::-1]]


def auc(x: np.ndarray, y: np.ndarray) -> float:
    """Area under a curve by the trapezoid rule."""
    return float(skm.auc(x, y))


@dataclass(frozen=True)
class Curves:
    """The ROC and precision-recall curve of one class against the rest, as tables for DVC plots."""

    name: str
    roc: pd.DataFrame  # fpr, tpr, threshold
    pr: pd.DataFrame  # recall, precision, threshold
    roc_auc: float
    average_precision: float


def curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> list[Curves]:
    """Binary: the curve of the second (positive) class. More classes: one-vs-rest per class, skipping a class
    that is absent from the labels (its curves are undefined)."""
    y_true = np.asarray(y_true)
    wanted = [1] if len(classes) == 2 else range(len(classes))
    out = []
    for k in wanted:
        positive = y_true == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, roc_thr = roc_curve(positive, probs[:, k])
        recall, precision, pr_thr = pr_curve(positive, probs[:, k])
        out.append(Curves(
            classes[k],
            pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": roc_thr}),
            pd.DataFrame({"recall": recall, "precision": precision, "threshold": pr_thr}),
            auc(fpr, tpr),
            float(skm.average_precision_score(positive, probs[:, k])),
        ))
    return out


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> tuple[float, pd.DataFrame]:
    """Expected calibration error of the top-label confidence, and the reliability table behind it.

    Images are binned by confidence (the predicted class's probability) into ``bins`` equal-width bins; ECE is
    the image-weighted mean gap |accuracy - mean confidence| over the bins (Guo et al., 2017).
    """
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == np.asarray(y_true)).astype(int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=bins)  # sklearn's own binning
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
    filled = counts > 0
    table = pd.DataFrame({
        "bin_low": edges[:-1][filled].round(6), "bin_high": edges[1:][filled].round(6), "confidence": mean_confidence,
        "accuracy": accuracy, "count": counts[filled],
    })
    ece = float((table["count"] * (table["accuracy"] - table["confidence"]).abs()).sum() / max(len(correct), 1))
    return ece, table


def class_balance(report: dict[str, dict[str, float]]) -> dict:
    """Balanced accuracy (the mean recall of the classes that have test images: each class counts the same however
    many images it has) and the worst such class's recall, with its name and the three worst classes."""
    present = {name: r["recall"] for name, r in report.items() if r["support"] > 0}
    worst = sorted(present, key=lambda name: (present[name], name))
    return {"balanced_accuracy": float(np.mean(list(present.values()))) if present else 0.0,
            "worst_class_recall": present[worst[0]] if worst else 0.0,
            "worst_classes": worst[:3]}


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], calibration_bins: int = 10
) -> dict:
    """Everything evaluate reports: accuracy, macro F1, balanced accuracy and the worst class's recall, per-class
    P/R/F1, confusion matrix, expected calibration error; ROC AUC and average precision (binary) or both per
    class, one-vs-rest (more classes)."""
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, len(classes))
    report = per_class(cm, classes)
    out = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(np.mean([r["f1"] for r in report.values()])),
        **class_balance(report),
        "per_class": report,
        "confusion_matrix": cm.tolist(),
        "ece": calibration(y_true, probs, calibration_bins)[0],
    }
    found = curves(y_true, probs, classes)
    if len(classes) == 2 and found:
        out["roc_auc"], out["average_precision"] = found[0].roc_auc, found[0].average_precision
    elif len(classes) > 2:
        out["one_vs_rest"] = {c.name: {"roc_auc": c.roc_auc, "average_precision": c.average_precision}
                              for c in found}
    return out

