"""The pipeline against MLflow for real: parallel runs through a tracking server on PostgreSQL, a run straight to
PostgreSQL, an unreachable server, and what a default run records and prints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from kennel.data.shards import read_split
from tests.conftest import (
    PIPELINE_EPOCHS,
    copy_project,
    free_port,
    project_runs,
    run_stages,
    set_params,
)

pytestmark = pytest.mark.slow


def test_unreachable_server_stops_train_before_any_training(project_copy):
    root = project_copy
    shutil.rmtree(root / "models")
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": "src"}
    out = subprocess.run([sys.executable, "stages/train.py"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and f"MLflow tracking server {uri}" in out.stderr and "unreachable" in out.stderr
    # stopped by the one health check, before MLflow's client made a request (and its minutes of retries): not a
    # stopwatch, which a loaded machine fails
    assert "Start it, or unset MLFLOW_TRACKING_URI" in out.stderr and "Retry" not in out.stderr
    assert not (root / "models").exists()


def test_parallel_runs_through_a_tracking_server_on_postgresql(pipeline, project_copy, tmp_path, tracking_server,
                                                               monkeypatch):
    """Two train stages at once against a real `mlflow server` on PostgreSQL (first contact with a new experiment
    at once), artifacts proxied by it; then each project's evaluate. The queue's own wiring (`dvc exp run --queue
    -j 2`, `dvc exp show` agreeing with MLflow) is tested on the project's sqlite store in
    test_pipeline_queue.py."""
    roots = [project_copy, copy_project(pipeline.root, tmp_path / "second")]
    for root, lr in zip(roots, (0.001, 0.01), strict=True):  # an experiment and a model of their own on the server
        set_params(root, **{"train.epochs": 1, "train.lr": lr, "mlflow.system_metrics": False,
                            "mlflow.experiment": "parallel", "mlflow.registered_model": "parallel"})
    uri = tracking_server.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    env = {**os.environ, "PYTHONPATH": "src"}
    trains = [subprocess.Popen([sys.executable, "stages/train.py"], cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for root in roots]
    for train in trains:
        out = train.communicate(timeout=600)[0]
        assert train.returncode == 0, out
    for root in roots:
        run_stages(root, ["evaluate"], monkeypatch)

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("parallel").experiment_id
    runs = client.search_runs([experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.001", "0.01"]
    for run in runs:
        assert "test_accuracy" in run.data.metrics and "kennel.model_uri" in run.data.tags
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert not [k for k in run.data.metrics if k.startswith("system/")]  # switched off in params
        assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} >= {"evaluation/roc.png"}
    (tmp_path / "loaded").mkdir()  # not a temp folder of MLflow's, which would stay behind
    model = mlflow.pytorch.load_model(runs[0].data.tags["kennel.model_uri"], dst_path=str(tmp_path / "loaded"))
    x = torch.from_numpy(np.array(read_split(roots[0] / "data/resized", "test")[0]))
    assert model(x).shape == (len(x), 2)
    # every run registered a version; the champion is the best, whichever finished first
    assert len(client.search_model_versions("name='parallel'")) == 2
    champion = client.get_model_version_by_alias("parallel", "champion")
    assert client.get_run(champion.run_id).data.metrics["test_accuracy"] == max(
        r.data.metrics["test_accuracy"] for r in runs)
    assert champion.tags["git.commit"] == client.get_run(champion.run_id).data.tags["git.commit"]
    uploaded = tracking_server.artifacts / experiment_id
    assert {p.parts[-4] for p in uploaded.rglob("confusion_matrix.png")} == {r.info.run_id for r in runs}
    for root in roots:
        assert len(project_runs(root)[1]) == 1  # nothing went to the local store: it holds the copied run alone


def test_a_run_straight_to_postgresql(project_copy, postgres, monkeypatch):
    """MLFLOW_TRACKING_URI=postgresql://... (no server): the train and evaluate stages, in-process, make first contact
    with a new database and land one complete, registered run. Parallel runs: the server on PostgreSQL above, and the
    project's sqlite store in test_pipeline_queue.py (the same first-contact lock)."""
    root = project_copy
    set_params(root, **{"train.epochs": 1})
    uri = postgres("direct")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_stages(root, ["train", "evaluate"], monkeypatch)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kennel").experiment_id])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1]
    (version,) = client.search_model_versions("name='kennel'")
    assert client.get_model_version_by_alias("kennel", "champion").run_id == version.run_id == run.info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")  # not a server this module stops
    assert len(project_runs(root)[1]) == 1  # nothing went to the local store: it holds the copied run alone


def test_default_repro_is_quiet_and_the_run_has_its_dataset_and_system_metrics(pipeline, tmp_path):
    root, output = pipeline.root, pipeline.output  # system metrics sampled every second there
    # kennel's own lines, and none of the third-party noise: warnings, MLflow's INFO lines, download bars
    assert f"train INFO epoch 1/{PIPELINE_EPOCHS}" in output and "test accuracy" in output
    assert "found 24 files" in output
    for noise in ("Warning:", "WARNING mlflow", "INFO mlflow", "CloudPickle", "interpreted in multiple ways",
                  "Downloading artifacts", "it/s]", "Successfully registered model", "Created version"):
        assert noise not in output, f"{noise!r} in the output of dvc repro:\n{output}"

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("kennel").experiment_id])
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "synthetic" and dataset_input.dataset.digest
    assert dataset_input.tags[0].value == "training"
    assert run.data.tags["dvc.data.data/resized"].endswith(".dir")
    assert run.data.tags["git.dirty"] == "false" and run.data.tags["git.branch"] == "main"
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    # the pyfunc is the model file run on load, not a pickle
    serving = mlflow.artifacts.download_artifacts(run.data.tags["kennel.serving_uri"], dst_path=str(tmp_path / "m"))
    assert (Path(serving) / "serving_model.py").exists() and not list(Path(serving).rglob("*.pkl"))
