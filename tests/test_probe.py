"""The linear probe: fit on frozen features, C chosen on val, its scores on the run, a warning when a model is below."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from kennel.train.checkpoint import probe_from_payload, probe_payload
from kennel.train.fine_tune import train
from kennel.train.probe import PROBE_CS, Probe, below_probe_warning, fit_probe
from tests.conftest import make_params


def blobs(n: int, classes: int, seed: int, dims: int = 8, spread: float = 0.3):
    """``n`` points per class around well-separated centres: linearly separable."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dims)[:classes] * 4
    x = np.concatenate([c + spread * rng.standard_normal((n, dims)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(classes), n)


@pytest.mark.parametrize("classes", [2, 3])
def test_probe_scores_one_on_separable_features_and_predicts_like_sklearn(classes):
    probe = fit_probe(blobs(30, classes, 0), blobs(10, classes, 1), blobs(10, classes, 2), classes=classes)
    assert probe.val_accuracy == 1.0 and probe.test_accuracy == 1.0
    assert probe.c in PROBE_CS and probe.weight.shape == (classes, 8) and probe.bias.shape == (classes,)
    assert probe.metrics() == {"baseline_val_accuracy": 1.0, "baseline_test_accuracy": 1.0, "baseline_c": probe.c}
    # the softmax head it gives a Linear layer makes sklearn's decisions, two classes included
    x, y = blobs(30, classes, 0)
    reference = LogisticRegression(C=probe.c, max_iter=1000).fit(x, y)
    test_x = blobs(20, classes, 3, spread=2.0)[0]  # overlapping points, where the two could disagree
    np.testing.assert_allclose(probe.predict_proba(test_x), reference.predict_proba(test_x), atol=1e-4)


def test_probe_picks_c_by_val_loss_and_reports_chance_on_random_labels():
    x, _ = blobs(40, 2, 0)
    y = np.random.default_rng(0).integers(0, 2, len(x))  # no signal: the strongest regularisation wins
    val_x, _ = blobs(20, 2, 1)
    probe = fit_probe((x, y), (val_x, np.random.default_rng(1).integers(0, 2, len(val_x))), classes=2)
    assert probe.c == min(PROBE_CS) and math.isnan(probe.test_accuracy)
    assert "baseline_test_accuracy" not in probe.metrics()


def test_without_val_the_probe_uses_the_default_c():
    probe = fit_probe(blobs(20, 2, 0), (np.empty((0, 8)), np.empty(0, int)), classes=2)
    assert probe.c == 1.0 and math.isnan(probe.val_accuracy) and probe.metrics() == {"baseline_c": 1.0}


def test_below_probe_warning_only_when_the_model_is_below_on_val():
    probe = Probe(1.0, 0.95, 0.1, 0.9, np.zeros((2, 1)), np.zeros(2))
    assert "0.9000 is below the linear probe's 0.9500" in below_probe_warning(0.9, probe)
    assert below_probe_warning(0.95, probe) == "" and below_probe_warning(0.9, None) == ""


def test_checkpoint_payload_keeps_the_probe():
    probe = fit_probe(blobs(10, 2, 0), blobs(5, 2, 1), classes=2)
    back = probe_from_payload(torch.load(_saved(probe_payload(probe)), weights_only=True))
    assert (back.c, back.val_accuracy) == (probe.c, probe.val_accuracy)
    np.testing.assert_array_equal(back.weight, probe.weight)


def _saved(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("finetune", ["head", "staged"])
def test_runs_with_a_frozen_phase_fit_the_probe_and_probe_init_starts_the_head_there(resized, finetune):
    params = make_params(**{"model.finetune": finetune, "train.epochs": 2, "train.head_epochs": 1,
                            "train.head_init": "probe", "train.lr": 1e-9, "train.select": "last"})
    result = train(params, resized)
    probe = result.probe
    assert probe is not None and set(result.baseline_metrics()) == {"baseline_val_accuracy",
                                                                     "baseline_test_accuracy", "baseline_c"}
    if finetune == "head":  # lr ~0: the head is still the probe's, so it scores what the probe scored on val
        np.testing.assert_allclose(result.model.head.weight.detach().numpy(), probe.weight, atol=1e-5)
        assert result.history[-1].val_accuracy == pytest.approx(probe.val_accuracy)


def test_full_fine_tuning_has_no_probe(resized):
    result = train(make_params(**{"model.finetune": "full", "train.epochs": 1}), resized)
    assert result.probe is None and result.baseline_metrics() == {} and result.below_baseline() == ""


def test_refit_trains_the_selected_epochs_again_on_train_and_val_only(resized, caplog):
    from kennel.data.shards import read_split

    n_train, n_val = (len(read_split(resized, s)[1]) for s in ("train", "val"))
    assert len(read_split(resized, "train+val")[1]) == n_train + n_val
    caplog.set_level("INFO", logger="kennel.train.fine_tune")
    params = make_params(**{"model.finetune": "staged", "train.epochs": 3, "train.head_epochs": 1,
                            "train.refit": True})
    result = train(params, resized)
    k = result.selected_epoch
    runs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training on")]
    assert len(runs) == 2 and f"{n_train} train / {n_val} val images" in runs[0]
    assert f"{n_train + n_val} train / 0 val images" in runs[1]  # the refit: val is in, nothing held out
    assert result.refit_images == n_train + n_val and len(result.history) == 3  # the selection run's history
    assert f"trained again on train + val for {k} epoch(s)" in result.selected_reason
    again = train(params.__class__(**{**params.__dict__, "train": params.train.__class__(
        **{**params.train.__dict__, "refit": False})}), resized)
    assert not torch.equal(again.model.head.weight, result.model.head.weight)  # the refit's weights are kept
