"""README's Team setup, for real: a DVC remote in a folder, a tracking server, and a second clone that pulls the
results instead of recomputing them and reproduces the committed result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import REPO, dvc, make_project, run, small_params
from tests.test_pipeline_mlflow import mlflow_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


def test_a_teammate_pulls_the_results_and_reproduces_them(tmp_path, mlflow_server, monkeypatch):  # noqa: F811
    uri, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # both machines share the tracking server
    remote = tmp_path / "dvc-remote"
    mine = make_project(tmp_path / "mine", small_params(**{"train.epochs": 1}))
    dvc(["remote", "add", "-d", "storage", str(remote)], mine)
    dvc(["repro"], mine)
    dvc(["push"], mine)
    run(["git", "add", "-A"], mine)
    run(["git", "commit", "-qm", "first result"], mine)
    commit = run(["git", "rev-parse", "HEAD"], mine).stdout.strip()
    recorded = json.loads((mine / "reports/metrics.json").read_text())["test"]

    theirs = tmp_path / "theirs"  # another machine: a clone, its own (empty) DVC cache
    run(["git", "clone", "-q", str(mine), str(theirs)], tmp_path)
    assert not (theirs / ".dvc/cache").exists() and not (theirs / "models/model.pt").exists()
    dvc(["pull"], theirs)
    assert (theirs / "models/model.pt").read_bytes() == (mine / "models/model.pt").read_bytes()
    status = dvc(["status"], theirs).stdout
    assert "up to date" in status, status
    again = dvc(["repro"], theirs).stdout
    assert "Running stage" not in again and "didn't change" in again, again

    out = subprocess.run([sys.executable, "-m", "kennel", "reproduce", commit], cwd=theirs, capture_output=True,
                         text=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0 and "reproduced" in out.stdout, out.stdout + out.stderr
    assert f"{recorded['accuracy']:.6f}" in out.stdout

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kennel").experiment_id])
    assert len(runs) == 2  # the original, and the reproduction made on the other machine, on the same server
    assert sorted(r.data.tags.get("kennel.reproduces", "") != "" for r in runs) == [False, True]
