"""Classification metrics on plain arrays: accuracy, per-class P/R/F1, confusion matrix, ROC and its AUC."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def per_class(cm: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class; 0 where a ratio has no denominator."""
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        name: {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": int(actual[i])}
        for i, name in enumerate(classes)
    }


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for a binary problem, one point per distinct score, starting at (0, 0)."""
    y_true, score = np.asarray(y_true).astype(bool), np.asarray(score, dtype=float)
    positives, negatives = y_true.sum(), (~y_true).sum()
    if positives == 0 or negatives == 0:
        raise ValueError("ROC needs both classes among the labels")
    order = np.argsort(-score, kind="mergesort")
    score, y_true = score[order], y_true[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    tps = np.cumsum(y_true)[last_of_each]
    fps = last_of_each + 1 - tps
    return (
        np.r_[0.0, fps / negatives],
        np.r_[0.0, tps / positives],
        np.r_[np.inf, score[last_of_each]],
    )


def auc(x: np.ndarray, y: np.ndarray) -> float:
    """Area under a curve by the trapezoid rule."""
    return float(np.trapezoid(y, x))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Everything evaluate reports: accuracy, macro F1, per-class P/R/F1, confusion matrix, ROC AUC (binary)."""
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, len(classes))
    report = per_class(cm, classes)
    out = {
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
        "macro_f1": float(np.mean([r["f1"] for r in report.values()])),
        "per_class": report,
        "confusion_matrix": cm.tolist(),
    }
    if len(classes) == 2 and len(np.unique(y_true)) == 2:
        fpr, tpr, _ = roc_curve(y_true == 1, probs[:, 1])
        out["roc_auc"] = auc(fpr, tpr)
    return out
