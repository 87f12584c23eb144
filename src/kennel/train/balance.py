"""Imbalanced classes: the loss's class weights (``train.class_weights``) and the train log's warnings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMBALANCE = 3.0  # warn when the largest class has more than this many times the smallest's train images
FEW_VAL = 10  # warn when a class has fewer val images: its val recall moves in steps of 10 points or more


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse class frequency, scaled so that a balanced split gets 1 for every class (scikit-learn's
    "balanced": n / (classes x count)); a class with no train image gets 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


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
