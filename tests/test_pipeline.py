"""The whole pipeline in real DVC repos (git init + dvc init in temp dirs) with a real sqlite MLflow store."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from kennel.cli.main import main as kennel
from kennel.data.shards import read_split
from tests.conftest import (
    PIPELINE_EPOCHS,
    copy_project,
    dvc,
    project_runs,
    run_cmd,
    write_params,
)

pytestmark = pytest.mark.slow
EPOCHS = PIPELINE_EPOCHS


@pytest.fixture(scope="module")
def project(pipeline):
    """The shared pipeline run, read only: its folder and what `dvc repro` printed."""
    return pipeline.root, pipeline.output


@pytest.fixture(scope="module")
def edited(pipeline, tmp_path_factory):
    """A copy of the run that the tests below edit in turn: each puts back what it changed."""
    return copy_project(pipeline.root, tmp_path_factory.mktemp("edited") / "project")


@pytest.fixture(scope="module")
def changed(pipeline, tmp_path_factory):
    """A copy of the run that the tests below change for good, in order: train params changed, then compare."""
    return copy_project(pipeline.root, tmp_path_factory.mktemp("changed") / "project")


def test_repro_writes_metrics_and_plots(project, tmp_path):
    root, out = project
    for stage in ("prepare", "resize", "audit", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((root / "reports/evaluation.json").read_text())["test"]
    assert 0 <= metrics["accuracy"] <= 1 and set(metrics["per_class"]) == {"cat", "dog"}
    headline = json.loads((root / "reports/metrics.json").read_text())
    assert headline["test_accuracy"] == metrics["accuracy"]
    n_test = json.loads((root / "data/resized/classes.json").read_text())["counts"]["test"]
    assert np.array(metrics["confusion_matrix"]).sum() == n_test > 0
    assert 0 <= metrics["roc_auc"] <= 1
    shown = dvc(["metrics", "show", "--json"], root).stdout
    assert json.loads(shown)  # dvc reads the metrics file
    assert "test_accuracy" in dvc(["metrics", "show"], root).stdout
    plots = dvc(["plots", "show", "--json"], root).stdout
    for title in ("Training loss", "Validation loss", "Accuracy", "Learning rate", "Confusion matrix", "Reliability",
                  "Top test losses", "reports/roc/dog.csv",
                  "reports/pr/dog.csv", "reports/figures/top_losses_gradcam.png", "reports/data/samples.png",
                  "reports/data/class_counts.csv"):
        assert title in plots
    html = dvc(["plots", "show", "-o", str(tmp_path / "plots_html")], root)
    assert (tmp_path / "plots_html" / "index.html").stat().st_size > 1000, html.stdout
    history = (root / "dvclive/plots/metrics/train_loss.tsv").read_text().splitlines()
    assert history[0] == "step\ttrain_loss"
    assert [line.split("\t")[0] for line in history[1:]] == [str(e) for e in range(1, EPOCHS + 1)]
    live = json.loads((root / "dvclive/metrics.json").read_text())
    assert live["step"] == EPOCHS and 1 <= live["selected_epoch"] <= EPOCHS and live["train_seconds"] > 0
    for png in ("confusion_matrix.png", "roc.png", "pr.png", "reliability.png", "top_losses.png",
                "top_losses_gradcam.png"):
        assert (root / "reports/figures" / png).read_bytes()[:4] == b"\x89PNG"
    for png in ("samples.png", "sizes.png", "class_counts.png", "rejected.png"):
        assert (root / "reports/data" / png).read_bytes()[:4] == b"\x89PNG"
    predictions = pd.read_csv(root / "reports/predictions.csv")
    assert len(predictions) == n_test and predictions["path"].is_unique
    assert (predictions["true"] == predictions["predicted"]).mean() == pytest.approx(metrics["accuracy"])
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["average_precision"] <= 1
    counts = pd.read_csv(root / "reports/data/class_counts.csv")
    assert counts["label"].tolist() == ["cat", "dog"] and counts["test"].sum() == n_test
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "resize", "audit", "train", "evaluate", "export"}


def test_mlflow_run_holds_everything(project):
    root, _ = project
    client, runs = project_runs(root)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    run_file = json.loads((root / "models/mlflow_run.json").read_text())
    assert run_file["run_id"] == run.info.run_id and str(root / "mlflow.db") in run_file["tracking_uri"]
    p = run.data.params
    assert p["train.lr"] == "0.001" and p["train.batch_size"] == "8" and p["resize.size"] == "32"
    assert p["data.source"] == "synthetic" and p["model.weights"] == "none"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, EPOCHS + 1))
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert {k: run.data.metrics[k] for k in metrics} == pytest.approx(metrics)  # the same names in both worlds
    assert "test_roc_auc" in run.data.metrics and "test_f1_cat" in run.data.metrics
    tags = run.data.tags
    assert tags["git.commit"] == run_cmd(root, "git", "rev-parse", "HEAD")
    assert tags["kennel.weights"] == "none" and tags["kennel.classes"] == "cat,dog"
    assert tags["kennel.amp"] in ("off", "bf16")
    assert tags["mlflow.runName"].endswith("@" + tags["git.commit"][:7])
    assert tags["mlflow.runName"].startswith("auto-adamw-lr0.001-bs8")  # the params as given: model.finetune auto
    assert tags["kennel.decision.finetune"].startswith("full: random init")  # what auto decided, and why
    assert tags["kennel.tta"] == "none" and tags["kennel.decision.tta"].startswith("none: no pretrained features")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {f"evaluation/{name}" for name in ("confusion_matrix.png", "roc.png", "pr.png", "reliability.png",
            "top_losses.png", "top_losses_gradcam.png", "metrics.json", "predictions.csv")} <= artifacts
    data = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/samples.png", "data/sizes.png", "data/class_counts.png", "data/rejected.png"} <= data
    audit = {a.path for a in client.list_artifacts(run.info.run_id, "audit")}
    assert {"audit/near_duplicates.csv", "audit/near_duplicates.png", "audit/metrics.json"} <= audit
    counts = json.loads((root / "data/audited/classes.json").read_text())["counts"]
    assert run.data.metrics["data_test"] == counts["test"] and run.data.metrics["audit_moved_images"] == 0
    assert run.data.metrics["audit_duplicate_groups"] == 0
    note = tags["mlflow.note.content"]
    assert note.startswith(f"**Test accuracy {metrics['test_accuracy']:.3f}**")
    assert f"of {EPOCHS} (train.select: auto, lowest val loss" in note  # auto kept the best epoch here
    assert f"runs/{run.info.run_id}/artifacts/evaluation/top_losses_gradcam.png" in note
    assert "test_ece" in run.data.metrics

    model = mlflow.pytorch.load_model(tags["kennel.model_uri"])
    x, y = read_split(root / "data/resized", "test")
    logits = model(torch.from_numpy(np.array(x)))
    assert logits.shape == (len(x), 2)
    accuracy = (logits.argmax(1).numpy() == y).mean()
    assert accuracy == pytest.approx(metrics["test_accuracy"])  # the logged model is the evaluated model


def test_an_audit_param_that_moves_no_image_does_not_retrain(project, project_copy):
    _, first = project
    # no pretrained weights here: one clear line, and near-copies still checked by the perceptual hash
    assert "near-duplicates use a perceptual hash" in first
    root = project_copy
    assert json.loads((root / "reports/audit/metrics.json").read_text())["audit_moved_images"] == 0
    assert (root / "data/audited/index.csv").read_bytes() == (root / "data/resized/index.csv").read_bytes()
    assert json.loads((root / "data/embeddings/meta.json").read_text())["kind"] == "phash"
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["audit"]["figure_pairs"] = 3
    params["audit"]["hash_distance"] = 20
    write_params(root / "params.yaml", params)
    assert set(json.loads(dvc(["status", "--json"], root).stdout)) == {"audit"}
    done = dvc(["repro"], root)
    out = done.stdout + done.stderr
    assert "Running stage 'audit'" in out and "Running stage 'train'" not in out, out
    assert "24 images, 0 computed (the rest cached)" in out  # the hashes came from data/embeddings
    assert json.loads(dvc(["status", "--json"], root).stdout) == {}


def test_second_repro_is_a_noop(project_copy):
    root = project_copy  # a copy: nothing may run dvc repro in the shared run; and a copy is a working project
    lock = (root / "dvc.lock").read_text()
    out = dvc(["repro"], root)
    assert "Running stage" not in out.stdout
    assert (root / "dvc.lock").read_text() == lock
    assert len(project_runs(root)[1]) == 1


@pytest.mark.parametrize("path,stages", [
    ("src/kennel/evaluate/figures.py", {"evaluate"}),  # evaluation code: train's model stays valid
    ("src/kennel/train/fine_tune.py", {"train", "evaluate"}),  # training code: the audit needs the model only
    ("src/kennel/model/network.py", {"audit", "train", "evaluate", "export"}),  # the model: the audit embeds with it
    ("src/kennel/export/onnx_export.py", {"export"}),  # exporting: the trained model stays valid
    ("src/kennel/audit/figures.py", {"audit"}),  # then train reruns only if the audited splits change
    ("src/kennel/data/manifest.py", {"prepare", "resize", "audit", "train", "evaluate", "export"}),
])
def test_editing_code_reruns_only_the_stages_that_run_it(edited, path, stages):
    root = edited
    path = root / path
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# edited\n")
        assert set(json.loads(dvc(["status", "--json"], root).stdout)) == stages
    finally:
        path.write_bytes(original)
    assert json.loads(dvc(["status", "--json"], root).stdout) == {}


def test_train_params_rerun_only_train_and_evaluate_here_on_two_gloo_processes(changed):
    root = changed
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["lr"] = 0.002
    params["train"]["nproc"] = 2  # two DDP processes with gloo, launched by the stage
    write_params(root / "params.yaml", params)
    status = json.loads(dvc(["status", "--json"], root).stdout)
    # DVC lists a stage whose own deps changed; evaluate reruns because its input (the model) changes.
    assert set(status) == {"train"}
    assert any("train.lr" in json.dumps(change) for change in status["train"])
    out = dvc(["repro", "evaluate"], root)  # the DDP-trained model's metrics (its export adds nothing to check here)
    assert "Running stage 'train'" in out.stdout and "Running stage 'evaluate'" in out.stdout
    assert all(f"Running stage '{s}'" not in out.stdout for s in ("prepare", "resize", "audit"))
    # the stage launched torchrun once; its two processes, started by torchrun, ran the stage without launching again
    # (the same path as a user's own `torchrun stages/train.py`)
    assert (out.stdout + out.stderr).count("launching 2 processes") == 1, out.stdout + out.stderr
    history = (root / "dvclive/plots/metrics/val_accuracy.tsv").read_text().splitlines()
    assert len(history) == 1 + EPOCHS  # header + one line an epoch, written once (rank 0 only)
    assert torch.load(root / "models/model.pt", weights_only=True)["classes"] == ["cat", "dog"]
    _, runs = project_runs(root)
    assert [r.data.params["train.lr"] for r in runs] == ["0.001", "0.002"]
    assert [r.data.params["train.nproc"] for r in runs] == ["1", "2"]
    assert runs[-1].data.tags["kennel.processes"] == "2" and "test_accuracy" in runs[-1].data.metrics


def test_compare_names_the_changed_params_metrics_and_images(changed, monkeypatch, capsys):
    root = changed
    _, runs = project_runs(root)  # the default run and the train params change of the test above
    first, second = runs[0].info.run_id, runs[1].info.run_id
    monkeypatch.chdir(root)  # in-process: the console script and `python -m kennel` are tested in test_cli.py
    assert kennel(["compare", first, second, "--top", "3", "--plot", "curves.png"]) == 0
    out = capsys.readouterr().out
    assert f"A: {first} -> run {first}" in out
    lr = next(line for line in out.splitlines() if line.startswith("train.lr"))
    assert lr.split()[1:] == ["0.001", "0.002"]
    rows = out.split("params that differ:")[1].split("metrics:")[0].strip().splitlines()
    assert [r.split() for r in rows] == [["A", "B"], ["param"], ["train.lr", "0.001", "0.002"],
                                         ["train.nproc", "1", "2"]]  # the params that differ, and nothing else
    assert "test_accuracy" in out and "selected_epoch" in out
    predictions = pd.read_csv(root / "reports/predictions.csv")
    improved = out.split("most improved from A to B (top 3):")[1]
    assert any(path in improved for path in predictions["path"])  # test images by name
    assert (root / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert kennel(["compare", "champion", "HEAD"]) == 0
    by_commit = capsys.readouterr().out
    assert "A: champion -> run" in by_commit and f"B: HEAD -> run {second}" in by_commit  # the newest at HEAD
    assert kennel(["compare", first, "no-such-run"]) == 2
    assert "'no-such-run': neither a run id" in capsys.readouterr().err
