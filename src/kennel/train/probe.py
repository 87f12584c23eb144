"""The linear probe: the baseline any fine-tuned model must beat, fit on the frozen backbone's features in seconds.

A logistic regression on the pretrained features is the closed-form answer to "train only the head": if all the
epochs of fine-tuning end below it, they cost time and lost accuracy, and a user should hear so (on val, where
it is legitimate to compare; the test numbers are reported next to the model's, never used to choose).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from kennel.data.parallel import resolve_workers

log = logging.getLogger(__name__)

# Inverse L2 strengths tried; the one with the lowest val log loss is kept (the smaller on a tie: more regular).
PROBE_CS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DEFAULT_C = 1.0  # without a val split there is nothing to choose on


@dataclass(frozen=True)
class Probe:
    """A fitted probe: its regularisation, its val/test scores (NaN where the split is empty), its weights."""

    c: float
    val_accuracy: float
    val_loss: float
    test_accuracy: float
    weight: np.ndarray  # classes x features, as a Linear head's weight
    bias: np.ndarray  # classes

    def metrics(self) -> dict[str, float]:
        """Under the names the run and ``dvc exp show`` carry; a split that is empty has no entry."""
        scores = {"baseline_val_accuracy": self.val_accuracy, "baseline_test_accuracy": self.test_accuracy,
                  "baseline_c": self.c}
        return {k: v for k, v in scores.items() if not math.isnan(v)}

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        logits = features @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def _fit(features: np.ndarray, labels: np.ndarray, c: float, classes: int) -> tuple[np.ndarray, np.ndarray]:
    # scikit-learn on first use: a run without pretrained weights fits no probe and skips its second of imports
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=1000).fit(features, labels)
    weight, bias = np.zeros((classes, features.shape[1])), np.zeros(classes)
    if len(model.classes_) == 2:  # sklearn keeps one row for two classes: split it into the softmax's two
        weight[model.classes_] = np.stack([-model.coef_[0], model.coef_[0]]) / 2
        bias[model.classes_] = np.array([-model.intercept_[0], model.intercept_[0]]) / 2
    else:
        weight[model.classes_], bias[model.classes_] = model.coef_, model.intercept_
    return weight, bias


def fit_probe(train: tuple, val: tuple, test: tuple | None = None, *, classes: int,
              cs: Sequence[float] = PROBE_CS) -> Probe:
    """Logistic regression on ``train`` = (features, labels), C out of ``cs`` chosen by val log loss (without val,
    the only one given, else the default); scored on val and test."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import log_loss

    x, y = _as_numpy(train[0]), np.asarray(train[1])
    if len(np.unique(y)) < 2:
        raise ValueError("the linear probe needs at least two classes in the train split")
    vx, vy = _as_numpy(val[0]), np.asarray(val[1])
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    grid = cs if len(vy) or len(cs) == 1 else (DEFAULT_C,)
    # one fit per C, side by side: lbfgs spends most of its time in numpy, which lets go of the GIL. The warning
    # filter is set around the threads, not in them: filters are process-wide, and setting them is not thread-safe.
    with warnings.catch_warnings(), ThreadPoolExecutor(min(len(grid), resolve_workers("auto"))) as pool:
        warnings.simplefilter("ignore", ConvergenceWarning)  # a few more iterations change nothing we report
        fits = list(pool.map(lambda c: _fit(x, y, c, classes), grid))
    for c, (weight, bias) in zip(grid, fits, strict=True):
        probe = Probe(c, math.nan, math.nan, math.nan, weight, bias)
        loss = log_loss(vy, probe.predict_proba(vx), labels=range(classes)) if len(vy) else math.nan
        if best is None or loss < best[1]:
            best = (c, loss, weight, bias)
    c, loss, weight, bias = best
    probe = Probe(c, math.nan, loss, math.nan, weight, bias)
    val_accuracy = _accuracy(probe, vx, vy)
    test_accuracy = _accuracy(probe, _as_numpy(test[0]), np.asarray(test[1])) if test is not None else math.nan
    probe = Probe(c, val_accuracy, loss, test_accuracy, weight, bias)
    log.info("linear probe (logistic regression on the frozen features, C %g chosen on val): val accuracy %.4f, "
             "test accuracy %.4f", c, val_accuracy, test_accuracy)
    return probe


def _accuracy(probe: Probe, features: np.ndarray, labels: np.ndarray) -> float:
    if not len(labels):
        return math.nan
    return float((probe.predict_proba(features).argmax(axis=1) == labels).mean())


def below_probe_warning(model_val_accuracy: float, probe: Probe | None) -> str:
    """The run's warning when the kept weights score below the probe on val ("" when not, or when unknown)."""
    if probe is None or math.isnan(probe.val_accuracy) or not model_val_accuracy < probe.val_accuracy:
        return ""
    return (f"the model's val accuracy {model_val_accuracy:.4f} is below the linear probe's "
            f"{probe.val_accuracy:.4f} (a logistic regression on the pretrained features): fine-tuning lost "
            "accuracy here; try model.finetune: head, a lower train.lr or fewer epochs")
