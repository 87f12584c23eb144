import math

import numpy as np
import pytest

from kennel.evaluate.metrics import (
    auc,
    calibration,
    classification_metrics,
    confusion_matrix,
    curves,
    per_class,
    pr_curve,
    roc_curve,
)
from kennel.model.inference import softmax


def test_confusion_matrix_counts_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 0, 1, 2, 2])
    assert confusion_matrix(y_true, y_pred, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_per_class_precision_recall_f1_by_hand():
    cm = np.array([[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    r = per_class(cm, ["a", "b", "c"])
    # a: tp 2, predicted 2, actual 3
    assert r["a"]["precision"] == pytest.approx(1.0)
    assert r["a"]["recall"] == pytest.approx(2 / 3)
    assert r["a"]["f1"] == pytest.approx(0.8)
    # b: tp 1, predicted 2, actual 2
    assert (r["b"]["precision"], r["b"]["recall"], r["b"]["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    # c: tp 1, predicted 2, actual 1
    assert (r["c"]["precision"], r["c"]["recall"]) == pytest.approx((0.5, 1.0))
    assert r["c"]["f1"] == pytest.approx(2 / 3)
    assert [r[k]["support"] for k in "abc"] == [3, 2, 1]


def test_class_never_predicted_has_zero_precision_not_nan():
    r = per_class(np.array([[3, 0], [2, 0]]), ["x", "y"])
    assert r["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}


def test_roc_points_and_auc_by_hand():
    y = np.array([1, 0, 1, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.4])
    fpr, tpr, thr = roc_curve(y, s)
    assert fpr.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1])
    assert thr[0] == np.inf and thr[1:].tolist() == pytest.approx(s.tolist())
    # 9 positive/negative pairs, 7 ranked correctly
    assert auc(fpr, tpr) == pytest.approx(7 / 9)


def test_roc_ties_share_one_point():
    fpr, tpr, _ = roc_curve(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.2, 0.1]))
    assert fpr.tolist() == pytest.approx([0, 0.5, 0.5, 1])
    assert tpr.tolist() == pytest.approx([0, 0.5, 1, 1])
    assert auc(fpr, tpr) == pytest.approx(0.625)  # a tie counts as half a correct pair


def test_roc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.array([1, 1]), np.array([0.2, 0.3]))


def test_classification_metrics_binary():
    probs = softmax(np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])))
    m = classification_metrics(np.array([0, 1, 1, 0]), probs, ["cat", "dog"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]
    assert m["roc_auc"] == pytest.approx(0.75)  # dog scores 0.8, 0.4 vs cat 0.1, 0.7: 3 of 4 pairs ordered
    assert m["macro_f1"] == pytest.approx(0.5)


def test_multiclass_has_roc_and_pr_per_class_not_one_roc_auc():
    m = classification_metrics(np.array([0, 1, 2]), np.eye(3), ["a", "b", "c"])
    assert m["accuracy"] == 1.0 and "roc_auc" not in m
    assert m["one_vs_rest"] == {k: {"roc_auc": 1.0, "average_precision": 1.0} for k in "abc"}


# A fixed case whose numbers were computed by the hand-written metrics this module replaced: the scikit-learn
# implementation must give the same outputs.
BINARY_P = np.array([0.9, 0.8, 0.75, 0.6, 0.6, 0.55, 0.4, 0.35, 0.3, 0.2, 0.1, 0.05])
BINARY_Y = np.array([1, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0])
THREE_P = np.array([[.7, .2, .1], [.5, .3, .2], [.2, .6, .2], [.1, .8, .1], [.3, .3, .4], [.4, .5, .1],
                    [.6, .1, .3], [.2, .7, .1], [.25, .25, .5], [.1, .2, .7]])
THREE_Y = np.array([0, 1, 1, 1, 2, 0, 2, 1, 2, 0])


def test_binary_numbers_are_pinned():
    m = classification_metrics(BINARY_Y, np.stack([1 - BINARY_P, BINARY_P], 1), ["cat", "dog"])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["macro_f1"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[4, 2], [2, 4]]
    assert m["per_class"]["cat"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 6})
    assert m["roc_auc"] == pytest.approx(0.6805555555555556)
    fpr, tpr, thr = roc_curve(BINARY_Y, BINARY_P)
    assert fpr.tolist() == pytest.approx([0, 0, 0, 1 / 6, 2 / 6, 2 / 6, 3 / 6, 3 / 6, 4 / 6, 5 / 6, 5 / 6, 1])
    assert tpr.tolist() == pytest.approx([0, 1 / 6, 2 / 6, 2 / 6, 3 / 6, 4 / 6, 4 / 6, 5 / 6, 5 / 6, 5 / 6, 1, 1])
    assert thr[0] == np.inf and thr[1:].tolist() == pytest.approx(sorted(set(BINARY_P), reverse=True))


def test_three_class_numbers_are_pinned():
    m = classification_metrics(THREE_Y, THREE_P, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.6) and m["macro_f1"] == pytest.approx(0.5833333333333334)
    assert m["confusion_matrix"] == [[1, 1, 1], [1, 3, 0], [1, 0, 2]]
    assert {k: (r["precision"], r["recall"], r["f1"], r["support"]) for k, r in m["per_class"].items()} == {
        "a": pytest.approx((1 / 3, 1 / 3, 1 / 3, 3)), "b": pytest.approx((0.75, 0.75, 0.75, 4)),
        "c": pytest.approx((2 / 3, 2 / 3, 2 / 3, 3)),
    }


def test_multiclass_curves_exist_per_class_one_vs_rest():
    found = curves(THREE_Y, THREE_P, ["a", "b", "c"])
    assert [c.name for c in found] == ["a", "b", "c"]
    for k, c in enumerate(found):
        assert list(c.roc.columns) == ["fpr", "tpr", "threshold"] and list(c.pr.columns) == ["recall", "precision",
                                                                                               "threshold"]
        assert c.roc.iloc[0][["fpr", "tpr"]].tolist() == [0, 0] and c.roc.iloc[-1][["fpr", "tpr"]].tolist() == [1, 1]
        assert c.pr["recall"].iloc[-1] == 1 and c.pr["recall"].is_monotonic_increasing
        # b scores its images 0.3, 0.6, 0.8, 0.7 and the rest 0.2, 0.3, 0.5, 0.1, 0.25, 0.2: of the 24 pairs, 0.3
        # loses to 0.5 and ties 0.3 (half a pair)
        if k == 1:
            assert c.roc_auc == pytest.approx(22.5 / 24)
    m = classification_metrics(THREE_Y, THREE_P, ["a", "b", "c"])
    assert set(m["one_vs_rest"]) == {"a", "b", "c"}


def test_a_class_absent_from_the_labels_has_no_curve():
    found = curves(np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3), ["a", "b", "c"])
    assert [c.name for c in found] == ["a", "b"]


def test_binary_curves_are_the_positive_class_and_pr_by_hand():
    (c,) = curves(BINARY_Y, np.stack([1 - BINARY_P, BINARY_P], 1), ["cat", "dog"])
    assert c.name == "dog" and c.roc_auc == pytest.approx(0.6805555555555556)
    recall, precision, thr = pr_curve(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    assert recall.tolist() == pytest.approx([0, 0.5, 0.5, 1, 1])
    assert precision.tolist() == pytest.approx([1, 1, 0.5, 2 / 3, 0.5])
    assert thr[0] == np.inf and thr[1:].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.1])


def test_ece_is_zero_when_calibrated_and_large_when_over_confident():
    rng = np.random.default_rng(0)
    n = 20000
    confidence = rng.uniform(0.5, 1.0, n)
    # calibrated: the predicted class (0) is right with exactly the probability it is given
    y = np.where(rng.random(n) < confidence, 0, 1)
    probs = np.stack([confidence, 1 - confidence], 1)
    ece, table = calibration(y, probs, bins=10)
    assert ece < 0.02
    assert table["count"].sum() == n and (table["bin_low"] >= 0.5).all()
    # over-confident: always 99% sure, right 60% of the time
    y = np.where(rng.random(n) < 0.6, 0, 1)
    ece, table = calibration(y, np.tile([0.99, 0.01], (n, 1)), bins=10)
    assert ece == pytest.approx(0.39, abs=0.02)
    assert len(table) == 1 and table["accuracy"].iloc[0] == pytest.approx(0.6, abs=0.02)


def test_ece_by_hand():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.45, 0.55]])
    y = np.array([0, 1, 1, 1])
    ece, table = calibration(y, probs, bins=2)  # bins [0, .5), [.5, 1]: all four in the top bin
    assert table["count"].tolist() == [4]
    assert ece == pytest.approx(abs(0.75 - np.mean([0.95, 0.9, 0.7, 0.55])))


def test_wilson_interval_matches_hand_computations():
    from kennel.evaluate.metrics import wilson_interval

    z2 = 1.959964 ** 2
    # no successes: the interval is [0, z^2 / (n + z^2)]
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    # all successes: [n / (n + z^2), 1]
    assert wilson_interval(141, 141) == pytest.approx((141 / (141 + z2), 1.0))
    # 139 of 141 (two test photos wrong), in the count form of the formula: (x + z^2/2 +- z sqrt(x(n-x)/n + z^2/4))
    # / (n + z^2) = (139 + 1.9207 +- 1.96 * sqrt(1.9716 + 0.9604)) / 144.8415 = 0.9498 .. 0.9961
    centre, half = (139 + z2 / 2) / (141 + z2), 1.959964 * math.sqrt(139 * 2 / 141 + z2 / 4) / (141 + z2)
    assert wilson_interval(139, 141) == pytest.approx((centre - half, centre + half))
    assert (round(centre - half, 4), round(centre + half, 4)) == (0.9498, 0.9961)
