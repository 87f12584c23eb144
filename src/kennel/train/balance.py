"""Imbalanced classes: the loss's class weights (``train.class_weights``) and the train log's warnings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMBALANCE = 3.0  # warn when the largest class has more than this many times the smallest's train images
FEW_VAL = 10  # warn when a class has fewer val images: its val recall moves in steps of 10 points or more
# class_weights auto weighs the loss once the largest class has more than this many times the smallest's train
# images; closer than that, the plain loss (a hash split of equal classes is never exactly equal, and weights of
# 0.97 and 1.03 would change nothing but the bits of the result). Measured on an imbalanced EuroSAT cut (5
# classes at 100 photos, 5 at 15): balanced accuracy on 3,000 balanced other tiles 0.796 -> 0.847, worst class's
# recall 0.45 -> 0.62.
WEIGH_FROM = 1.5


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse class frequency, scaled so that a balanced split gets 1 for every class (scikit-learn's
    "balanced": n / (classes x count)); a class with no train image gets 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def size_ratio(labels: np.ndarray, num_classes: int) -> float:
    """The largest class's train images over the smallest present class's."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def weighs(setting: str, labels: np.ndarray, num_classes: int) -> bool:
    """``train.class_weights``: auto weighs the loss when the classes are more than ``WEIGH_FROM`` apart."""
    return setting == "auto" and size_ratio(labels, num_classes) > WEIGH_FROM


def weights_reason(setting: str, labels: np.ndarray, num_classes: int) -> str:
    """Whether the loss weighs the classes, and why, in words (the log, the run's tag)."""
    ratio = size_ratio(labels, num_classes)
    if setting != "auto":
        return "none: train.class_weights none"
    if ratio > WEIGH_FROM:
        return (f"inverse frequency: the largest class has {ratio:.1f} x the smallest's train images (more than "
                f"{WEIGH_FROM:g} x; train.class_weights auto)")
    return f"none: the classes are within {WEIGH_FROM:g} x of each other ({ratio:.2f} x; train.class_weights auto)"


def balance_warnings(train_labels: np.ndarray, val_labels: np.ndarray, classes: Sequence[str],
                     weighted: bool) -> list[str]:
    """What the train log warns about the splits: classes far apart in size, classes with few val images."""
    k = len(classes)
    train, val = (np.bincount(np.asarray(y, dtype=np.int64), minlength=k) for y in (train_labels, val_labels))
    warnings = []
    big, small = int(train.argmax()), int(train.argmin())
    if train[small] * IMBALANCE < train[big]:
        fix = "the loss weighs classes by inverse frequency (train.class_weights: auto)" if weighted else \
            "consider train.class_weights: auto; judge runs by test_balanced_accuracy and test_worst_class_recall"
        warnings.append(f"imbalanced classes: {classes[big]} has {train[big]} train images, {classes[small]} "
                        f"{train[small]} ({train[big] / max(train[small], 1):.1f} x); {fix}")
    few = [f"{classes[i]} ({val[i]})" for i in range(k) if val[i] < FEW_VAL]
    if len(val_labels) and few:
        warnings.append(f"few val images for {', '.join(few)}: selection and early stopping see these classes "
                        f"through fewer than {FEW_VAL} images each")
    return warnings
