"""The pipeline against MLflow for real: a tracking server, an unreachable one, and parallel queued experiments."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from kennel.data.shards import read_split
from tests.conftest import BIN, dvc, free_port, make_project, small_params

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def tracking_server(backend: str, artifacts: Path):
    """A real `mlflow server` on 127.0.0.1 with ``backend``, artifacts proxied into ``artifacts``; yields its URI."""
    port = free_port()
    # The server logs every request: into a file, since an unread pipe fills up and stalls the server.
    log = artifacts.parent / f"mlflow-server-{port}.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", backend,
             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # minutes on a loaded machine
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            if server.poll() is not None:
                raise AssertionError(log.read_text()) from None
            time.sleep(0.5)
    try:
        yield uri
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=120)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1: sqlite backend, artifacts proxied into a temp dir."""
    store = tmp_path / "server"
    store.mkdir()
    with tracking_server(f"sqlite:///{store / 'mlflow.db'}", store / "artifacts") as uri:
        yield uri, store


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    pg_ctl = found[-1] if found else (Path(shutil.which("pg_ctl")) if shutil.which("pg_ctl") else None)
    if pg_ctl is None:
        pytest.fail("PostgreSQL server binaries not found: `make test` installs them (apt-get install postgresql)")
    return pg_ctl.parent


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server on 127.0.0.1 (the distribution's binaries), in a temp dir; yields a function that
    creates a database and returns its URI. PostgreSQL refuses to run as root: then it runs as `postgres`."""
    import psycopg

    bin_dir, port = postgres_bin(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="kennel-pg-"))  # not under pytest's root-only temp dirs
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, timeout=300)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "300",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True, timeout=400)
    server = f"postgresql://mlflow@127.0.0.1:{port}"

    def database(name: str) -> str:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:  # CREATE DATABASE: no transaction
            conn.execute(f"CREATE DATABASE {name}")
        return f"{server}/{name}"

    try:
        yield database
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_pipeline_against_a_tracking_server(tmp_path, mlflow_server, monkeypatch):
    uri, store = mlflow_server
    root = make_project(tmp_path / "project", small_params(**{"mlflow.system_metrics": False}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    dvc(["repro"], root)
    assert not (root / "mlflow.db").exists()  # nothing went to the local store

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kennel").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    assert "test_accuracy" in run.data.metrics and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert not [k for k in run.data.metrics if k.startswith("system/")]  # switched off in params
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


@pytest.mark.parametrize("store", ["sqlite", "postgresql-server", "postgresql"])
def test_parallel_queued_experiments_each_land_one_complete_run(tmp_path, store, request, monkeypatch):
    """Four experiments on two workers: the project's sqlite store, a tracking server on PostgreSQL, and
    MLFLOW_TRACKING_URI=postgresql://... straight to the database."""
    root = make_project(tmp_path / "project", small_params(**{"train.epochs": 1, "train.batch_size": 8}))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with contextlib.ExitStack() as stack:
        if store != "sqlite":
            uri = request.getfixturevalue("postgres")(store.replace("-", "_"))
            if store == "postgresql-server":
                uri = stack.enter_context(tracking_server(uri, tmp_path / "artifacts"))
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the queue's workers inherit it
        _queue_four_and_check(root, uri)
    if store != "sqlite":
        assert not (root / "mlflow.db").exists()


def _queue_four_and_check(root: Path, uri: str) -> None:
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

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
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
                metrics = data["metrics"]["reports/metrics.json"]["data"]
                assert str(params["lr"]) == run.data.params["train.lr"]
                assert str(params["batch_size"]) == run.data.params["train.batch_size"]
                assert metrics["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
                assert metrics["test_macro_f1"] == pytest.approx(run.data.metrics["test_macro_f1"])
                seen += 1
    assert seen == 4, json.dumps(shown)[:3000]
    versions = client.search_model_versions("name='kennel'")
    assert len(versions) == 4
    champion = client.get_model_version_by_alias("kennel", "champion")
    best = max(r.data.metrics["test_accuracy"] for r in runs)
    assert client.get_run(champion.run_id).data.metrics["test_accuracy"] == best


def test_default_repro_is_quiet_and_the_run_has_its_dataset_and_system_metrics(tmp_path, monkeypatch):
    root = make_project(tmp_path / "project", small_params(**{"train.epochs": 1}))
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # MLflow's 10 s outlasts this tiny run
    out = dvc(["repro"], root)
    output = out.stdout + out.stderr
    # kennel's own lines, and none of the third-party noise: warnings, MLflow's INFO lines, download bars
    assert "train INFO epoch 1/1" in output and "test accuracy" in output and "found 24 files" in output
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
