"""The learning-rate range test: a finite suggestion, its plot, and an MLflow run of its own."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torchvision.models import resnet18

from kennel.audit.splits import write_audited
from kennel.core.params import params_from_dict
from kennel.data.shards import read_index, read_meta
from kennel.train.fine_tune import train
from kennel.train.lr_find import lr_find, plot, suggest
from tests.conftest import REPO, Killed, build_dataset, kill_at, project_runs, small_params, write_params


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = [10 ** (e / 4) for e in range(-28, 4)]
    losses = [1 / (1 + math.exp(4 * (math.log10(lr) + 3))) + (lr / 0.1) ** 2 for lr in lrs]  # falls fastest at 1e-3
    assert 10 ** -3.5 <= suggest(lrs, losses) <= 10 ** -2.5
    assert math.isnan(suggest([1e-3], [1.0])) and math.isnan(suggest([], []))  # too few points: no suggestion
    assert math.isnan(suggest(lrs[:4], losses[:4]))
    assert math.isnan(suggest(lrs, [1.0] * 3 + [0.9 + e / 100 for e in range(len(lrs) - 3)]))  # never falls


def test_suggestion_skips_the_smoothing_artefact_at_the_start_and_the_divergence_at_the_end():
    # The bias-corrected EMA at the start averages a few batches: here it drops sharply over the first 3 points
    # (steeper than the real descent: the old suggestion returned lrs[0] here), then a noisy plateau, the real
    # descent around 1e-2, and divergence.
    lrs = [10 ** (e / 10) for e in range(-70, 11)]
    losses = [0.7 + 0.01 * math.sin(3 * i) + 0.5 / (1 + math.exp(4 * (math.log10(lr) + 2))) + 0.5 * (lr / 0.3) ** 2
              for i, lr in enumerate(lrs)]
    losses[:3] = [2.5, 1.8, 1.4]
    assert losses[0] - losses[1] > max(a - b for a, b in zip(losses[3:], losses[4:], strict=False))
    lr = suggest(lrs, losses)
    assert 10 ** -2.5 <= lr <= 10 ** -1.5 and lr not in (lrs[0], lrs[-1])
    lrs, losses = lrs[:50], losses[:50]  # a sweep that stops mid-descent: its minimum is its last point
    assert min(losses) == losses[-1] and suggest(lrs, losses) not in (lrs[0], lrs[-1])


def test_range_test_on_tiny_data_gives_a_finite_lr_and_a_plot(tmp_path):
    data = build_dataset(tmp_path / "data", per_class=8)
    for finetune in ("head", "full"):
        result = lr_find(params_from_dict(small_params(**{"model.finetune": finetune})), data, steps=30,
                         end_lr=100.0)
        assert 3 <= len(result.lrs) <= 30 and result.lrs == sorted(result.lrs)
        assert math.isfinite(result.suggestion) and result.suggestion in result.lrs
        assert result.suggestion not in (result.lrs[0], result.lrs[-1])
    png = plot(result, tmp_path / "lr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_the_suggestion_and_records_a_run_without_touching_pipeline_outputs(tmp_path, monkeypatch,
                                                                                      capsys):
    from kennel.cli.main import main

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    write_params(tmp_path / "params.yaml", small_params(**{"model.finetune": "head"}))
    resized = build_dataset(tmp_path / "data", per_class=8)
    write_audited(tmp_path / "data/audited", read_index(resized), resized, read_meta(resized))  # nothing moved
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "suggested learning rate: " in out
    assert (tmp_path / "reports/lr_find.png").is_file() and not (tmp_path / "models").exists()
    client, runs = project_runs(tmp_path)
    assert len(runs) == 1 and runs[0].data.tags["kennel.kind"] == "lr-find"
    suggestion = runs[0].data.metrics["lr_suggestion"]
    assert math.isfinite(suggestion) and f"{runs[0].data.tags['kennel.lr_suggestion']}" in out
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "lr_find")] == ["lr_find/lr_find.png"]


@pytest.mark.parametrize("finetune,epochs", [("full", 2), ("staged", 3)])
def test_the_sweep_is_the_optimizer_training_builds_for_that_phase(tmp_path, finetune, epochs):
    """From pretrained weights: two groups, the backbone at lr x backbone_lr_mult, as the run's checkpoint in the
    phase swept (the first all-layer one) holds them."""
    data = build_dataset(tmp_path / "data", per_class=8)
    torch.manual_seed(1)
    torch.save(resnet18(num_classes=5).state_dict(), tmp_path / "pretrained.pth")  # another head: dropped
    params = params_from_dict(small_params(**{
        "model.finetune": finetune, "model.weights": str(tmp_path / "pretrained.pth"), "train.epochs": epochs,
        "train.head_epochs": 1, "train.backbone_lr_mult": 0.1}))
    result = lr_find(params, data, steps=6)
    assert result.phase.index == epochs - 1 and not result.phase.frozen
    head = 2  # fc weight and bias
    assert [n for n, _ in result.groups] == [head, len(list(resnet18().parameters())) - head]
    assert [ratio for _, ratio in result.groups] == pytest.approx([1.0, 0.1])
    assert result.swept.startswith(f"phase {epochs - 1} of {finetune} (all layers;")

    with pytest.raises(Killed):  # the checkpoint of the epoch before: inside the phase swept
        train(params, data, on_epoch=kill_at(epochs), checkpoint=tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["phase"] == result.phase.index
    trained = [(len(g["params"]), g["initial_lr"] / params.train.lr) for g in checkpoint["optimizer"]["param_groups"]]
    assert [n for n, _ in trained] == [n for n, _ in result.groups]
    assert [r for _, r in trained] == pytest.approx([r for _, r in result.groups])


def test_head_mode_sweeps_the_head_alone(tmp_path):
    data = build_dataset(tmp_path / "data", per_class=8)
    result = lr_find(params_from_dict(small_params(**{"model.finetune": "head"})), data, steps=6)
    assert result.phase.frozen and result.groups == [(2, 1.0)]
    assert result.swept.startswith("phase 1 of head (the head on cached features;")
