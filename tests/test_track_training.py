"""The train stage's MLflow side as a library call: one run with params, data, per-epoch metrics, tags and models."""

from __future__ import annotations

import json

import pytest
import torch

from kennel.core.params import params_from_dict
from kennel.track.training import train_and_log
from tests.conftest import project_runs, small_params, write_params


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    """prepare, resize and audit run in ``tmp_path`` (a git-less folder) with the shrunken params."""
    from stages.audit import main as audit
    from stages.prepare import main as prepare
    from stages.resize import main as resize

    (tmp_path / ".dvc").mkdir()  # the project root marker
    monkeypatch.chdir(tmp_path)
    raw = small_params(**{"train.epochs": 2})
    write_params(tmp_path / "params.yaml", raw)
    assert prepare([]) == 0 and resize([]) == 0 and audit([]) == 0
    return tmp_path, params_from_dict(raw)


def test_train_and_log_records_one_complete_run(prepared):
    root, params = prepared
    result = train_and_log(params, root)
    client, (run,) = project_runs(root)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(params.train.lr) and run.data.params["model.arch"] == "resnet18"
    assert run.data.metrics["data_kept"] == json.loads((root / "reports/data_summary.json").read_text())["kept"]
    counts = json.loads((root / "data/audited/classes.json").read_text())["counts"]
    assert run.data.metrics["data_train"] == counts["train"] and run.data.metrics["audit_moved_images"] == 0
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2] and [m.value for m in history] == [
        r.val_accuracy for r in result.history]
    tags = run.data.tags
    assert tags["kennel.selected_epoch"] == str(result.selected_epoch) and tags["kennel.classes"] == "cat,dog"
    assert tags["kennel.data_versioned"] == "true"  # synthetic: the params are the data
    assert tags["kennel.model_uri"].startswith("models:/") and tags["kennel.serving_uri"].startswith("models:/")
    assert json.loads((root / "models/mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert (root / "models/model.pt").is_file()
    for name in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr", "images_per_second"):
        rows = (root / f"dvclive/plots/metrics/{name}.tsv").read_text().splitlines()
        assert rows[0] == f"step\t{name}" and len(rows) == 1 + len(result.history)
    live = json.loads((root / "dvclive/metrics.json").read_text())
    assert live["val_accuracy"] == result.history[-1].val_accuracy and live["step"] == result.history[-1].epoch
    assert live["selected_epoch"] == result.selected_epoch  # DVCLive and MLflow: the same numbers
    assert not (root / "dvclive" / "dvc.yaml").exists() and not (root / "dvc.yaml").exists()
    assert torch.load(root / "models/checkpoint.pt", weights_only=True)["complete"] is True


def test_a_staged_run_from_pretrained_weights_logs_the_probe_the_blend_and_its_decisions(prepared):
    import torchvision

    root, _ = prepared
    torch.manual_seed(1)
    weights = root / "pretrained.pth"
    torch.save(torchvision.models.get_model("mobilenet_v3_small").state_dict(), weights)
    params = params_from_dict(small_params(**{
        "train.epochs": 2, "model.finetune": "staged", "train.head_epochs": 1, "train.select": "last",
        "model.arch": "mobilenet_v3_small", "model.weights": str(weights)}))
    result = train_and_log(params, root)
    _, (run,) = project_runs(root)
    metrics = run.data.metrics
    assert metrics["baseline_val_accuracy"] == pytest.approx(result.probe.val_accuracy)
    assert metrics["baseline_test_accuracy"] == pytest.approx(result.probe.test_accuracy)
    assert metrics["baseline_c"] == result.probe.c
    assert result.blended_val is not None  # epoch 2 (all layers) kept, then blended with the frozen phase's end
    assert [metrics["blended_val_loss"], metrics["blended_val_accuracy"]] == pytest.approx(list(result.blended_val))
    assert f"then blended {result.blend:g} x epoch 2" in run.data.tags["kennel.selected_reason"]
    # the shipped train.blend auto chose it on val; every decision is a tag of the run
    assert run.data.tags["kennel.decision.blend"] == result.decisions["blend"]
    assert run.data.tags["kennel.decision.blend"].startswith(f"{result.blend:g}: the lowest val loss")
    assert run.data.tags["kennel.decision.finetune"] == "staged: model.finetune staged"
    assert run.data.tags["kennel.decision.batchnorm"] == result.decisions["batchnorm"]
    live = json.loads((root / "dvclive/metrics.json").read_text())
    assert live["baseline_val_accuracy"] == pytest.approx(result.probe.val_accuracy)
    assert live["selected_val_accuracy"] == pytest.approx(result.blended_val[1])  # the weights kept, not epoch 2's
