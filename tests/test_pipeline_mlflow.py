"""The pipeline against MLflow for real: a tracking server, an unreachable one, and parallel queued experiments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pytest
import torch

from kennel.data.tensors import read_split
from tests.conftest import BIN, dvc, free_port, make_project, small_params

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1: sqlite backend, artifacts proxied into a temp dir."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            if server.poll() is not None:
                raise AssertionError(server.stdout.read()) from None
            time.sleep(0.5)
    try:
        yield uri, store
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def test_pipeline_against_a_tracking_server(tmp_path, mlflow_server, monkeypatch):
    uri, store = mlflow_server
    root = make_project(tmp_path / "project", small_params())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    dvc(["repro"], root)
    assert not (root / "mlflow.db").exists()  # nothing went to the local store

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kennel").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    assert "test_accuracy" in run.data.metrics and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} >= {"evaluation/roc.png"}
    assert list((store / "artifacts").rglob("confusion_matrix.png"))  # uploaded through the server
    model = mlflow.pytorch.load_model(run.data.tags["kennel.model_uri"])
    x = torch.from_numpy(np.array(read_split(root / "data/resized", "test")[0]))
    assert model(x).shape == (len(x), 2)
    version = client.get_model_version_by_alias("kennel", "champion")
    assert version.run_id == run.info.run_id and version.tags["git.commit"] == run.data.tags["git.commit"]


def test_unreachable_server_stops_train_before_any_training(tmp_path, monkeypatch):
    root = make_project(tmp_path / "project", small_params())
    dvc(["repro", "resize"], root)
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": "src"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "stages/train.py"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and f"MLflow tracking server {uri}" in out.stderr and "unreachable" in out.stderr
    assert time.perf_counter() - start < 60  # seconds (mostly imports), not MLflow's minutes of retries
    assert not (root / "models").exists()


def test_parallel_queued_experiments_each_land_one_complete_run(tmp_path):
    root = make_project(tmp_path / "project", small_params(**{"train.epochs": 1, "train.batch_size": 8}))
    dvc(["exp", "run", "--queue", "-S", "train.lr=0.001,0.01", "-S", "train.batch_size=4,8"], root)
    dvc(["queue", "start", "-j", "2"], root)
    deadline, status = time.time() + 900, ""
    while time.time() < deadline:
        status = dvc(["queue", "status"], root).stdout
        if "Queued" not in status and "Running" not in status and status.count("Success") + status.count(
                "Failed") >= 4:
            break
        time.sleep(3)
    assert status.count("Success") == 4, status
    logs = "".join(dvc(["queue", "logs", line.split()[0]], root, check=False).stdout
                   for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker"))
    assert "database is locked" not in logs

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("kennel").experiment_id])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    by_exp = {r.data.tags["dvc.exp_name"]: r for r in runs}
    assert len(by_exp) == 4 and all("test_accuracy" in r.data.metrics and "kennel.model_uri" in r.data.tags
                                    for r in runs)
    assert sorted((r.data.params["train.lr"], r.data.params["train.batch_size"]) for r in runs) == [
        ("0.001", "4"), ("0.001", "8"), ("0.01", "4"), ("0.01", "8")]

    # `dvc exp show` and MLflow agree on params and metrics, experiment by experiment
    shown = json.loads(dvc(["exp", "show", "--json"], root).stdout)
    seen = 0
    for baseline in shown:
        for exp in (baseline.get("experiments") or []):
            name = exp.get("name")
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                name = rev.get("name") or name
                if name not in by_exp or not data:
                    continue
                run = by_exp[name]
                params = data["params"]["params.yaml"]["data"]["train"]
                metrics = data["metrics"]["reports/metrics.json"]["data"]["test"]
                assert str(params["lr"]) == run.data.params["train.lr"]
                assert str(params["batch_size"]) == run.data.params["train.batch_size"]
                assert metrics["accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
                assert metrics["macro_f1"] == pytest.approx(run.data.metrics["test_macro_f1"])
                seen += 1
    assert seen == 4, json.dumps(shown)[:3000]
    versions = client.search_model_versions("name='kennel'")
    assert len(versions) == 4
    champion = client.get_model_version_by_alias("kennel", "champion")
    best = max(r.data.metrics["test_accuracy"] for r in runs)
    assert client.get_run(champion.run_id).data.metrics["test_accuracy"] == best


def test_manifest_is_the_runs_dataset_input(tmp_path):
    root = make_project(tmp_path / "project", small_params(**{"train.epochs": 1}))
    dvc(["repro"], root)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("kennel").experiment_id])
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "synthetic" and dataset_input.dataset.digest
    assert dataset_input.tags[0].value == "training"
    assert run.data.tags["dvc.data.data/resized"].endswith(".dir")
    assert run.data.tags["git.dirty"] == "false" and run.data.tags["git.branch"] == "main"
