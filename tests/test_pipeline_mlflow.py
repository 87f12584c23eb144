"""The pipeline against MLflow for real: parallel queued experiments through a tracking server on PostgreSQL, a run
straight to PostgreSQL, an unreachable server, and what a default run records and prints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from kennel.data.shards import read_split
from tests.conftest import (
    PIPELINE_EPOCHS,
    dvc,
    experiments_agree,
    free_port,
    project_runs,
    run_stages,
    set_params,
    tracking_server,
    wait_for_queue,
)

pytestmark = pytest.mark.slow


def test_unreachable_server_stops_train_before_any_training(project_copy):
    root = project_copy
    shutil.rmtree(root / "models")
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": "src"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "stages/train.py"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and f"MLflow tracking server {uri}" in out.stderr and "unreachable" in out.stderr
    assert time.perf_counter() - start < 60  # seconds (mostly imports), not MLflow's minutes of retries
    assert not (root / "models").exists()


def test_parallel_experiments_through_a_tracking_server_on_postgresql(project_copy, tmp_path, postgres, monkeypatch):
    """Two experiments on two workers against a real `mlflow server` on PostgreSQL, artifacts proxied by it."""
    root = project_copy
    set_params(root, **{"train.epochs": 1, "mlflow.system_metrics": False})
    artifacts = tmp_path / "artifacts"
    with tracking_server(postgres("server"), artifacts) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the queue's workers inherit it
        client, runs = _queue_and_check(root, uri)
        for run in runs:
            assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1]
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")
            assert not [k for k in run.data.metrics if k.startswith("system/")]  # switched off in params
            assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} >= {"evaluation/roc.png"}
        model = mlflow.pytorch.load_model(runs[0].data.tags["kennel.model_uri"])
        x = torch.from_numpy(np.array(read_split(root / "data/resized", "test")[0]))
        assert model(x).shape == (len(x), 2)
        version = client.get_model_version_by_alias("kennel", "champion")
        assert version.tags["git.commit"] == client.get_run(version.run_id).data.tags["git.commit"]
    assert list(artifacts.rglob("confusion_matrix.png"))  # uploaded through the server
    assert len(project_runs(root)[1]) == 1  # nothing went to the local store: it holds the copied run alone


def test_a_run_straight_to_postgresql(project_copy, postgres, monkeypatch):
    """MLFLOW_TRACKING_URI=postgresql://... (no server): the train and evaluate stages, in-process, make first contact
    with a new database and land one complete, registered run. Parallel runs: the server on PostgreSQL above, and the
    project's sqlite store in test_pipeline.py (the same first-contact lock)."""
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


def _queue_and_check(root: Path, uri: str):
    """Queue two experiments, run them on two workers; check that each landed one complete run, that
    `dvc exp show` agrees with MLflow and that the champion is the better one. Returns (client, runs)."""
    dvc(["exp", "run", "--queue", "-S", "train.lr=0.001,0.01"], root)
    dvc(["queue", "start", "-j", "2"], root)
    status = wait_for_queue(root, 2)
    assert status.count("Success") == 2, status
    logs = "".join(dvc(["queue", "logs", line.split()[0]], root, check=False).stdout
                   for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker"))
    assert "database is locked" not in logs

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kennel").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    by_exp = {r.data.tags["dvc.exp_name"]: r for r in runs}
    assert len(by_exp) == 2 and all("test_accuracy" in r.data.metrics and "kennel.model_uri" in r.data.tags
                                    for r in runs)
    assert sorted((r.data.params["train.lr"], r.data.params["train.batch_size"]) for r in runs) == [
        ("0.001", "8"), ("0.01", "8")]

    # `dvc exp show` and MLflow agree on params and metrics, experiment by experiment
    shown = json.loads(dvc(["exp", "show", "--json"], root).stdout)
    assert experiments_agree(shown, by_exp) == 2, json.dumps(shown)[:3000]
    versions = client.search_model_versions("name='kennel'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("kennel", "champion")
    best = max(r.data.metrics["test_accuracy"] for r in runs)
    assert client.get_run(champion.run_id).data.metrics["test_accuracy"] == best
    return client, runs


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
