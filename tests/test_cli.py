"""`python -m kennel ui` starts a real MLflow UI on 127.0.0.1 that shows the project's runs."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from tests.conftest import REPO, free_port


def test_ui_refuses_without_runs(tmp_path):
    (tmp_path / ".dvc").mkdir()
    out = subprocess.run([sys.executable, "-m", "kennel", "ui"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=60)
    assert out.returncode == 2 and "run `dvc repro` first" in out.stderr


@pytest.mark.slow
def test_ui_serves_the_project_store(tmp_path):
    (tmp_path / ".dvc").mkdir()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("kennel-ui-test")
    with mlflow.start_run(experiment_id=exp, run_name="visible-run"):
        mlflow.log_param("train.lr", 0.01)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "kennel", "ui", "--port", str(port)], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search"
        body = json.dumps({"experiment_ids": [exp]}).encode()
        deadline, reply = time.time() + 90, None
        while time.time() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(request, timeout=5).read())
                break
            except OSError:
                time.sleep(1)
        assert reply is not None, server.stdout.read() if server.poll() is not None else "no answer"
        assert [r["info"]["run_name"] for r in reply["runs"]] == ["visible-run"]
    finally:
        server.terminate()
        server.wait(timeout=30)
