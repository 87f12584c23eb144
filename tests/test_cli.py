"""`python -m kennel ui` starts a real MLflow UI on 127.0.0.1 that shows the project's runs."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from kennel import track
from kennel.cli.ui import ui_url
from tests.conftest import REPO, blocking, free_port


def test_ui_url_is_the_experiments_runs_view():
    assert ui_url("127.0.0.1", 5000, "3") == "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    assert ui_url("0.0.0.0", 8080, None) == "http://127.0.0.1:8080"  # where a browser on this machine finds it


def test_ui_refuses_without_runs(tmp_path):
    (tmp_path / ".dvc").mkdir()
    out = subprocess.run([sys.executable, "-m", "kennel", "ui"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=60)
    assert out.returncode == 2 and "run `dvc repro` first" in out.stderr


@pytest.mark.slow
def test_ui_serves_the_project_store_and_opens_its_runs_view(tmp_path):
    (tmp_path / ".dvc").mkdir()
    exp = track.experiment_id("kennel", tmp_path)  # the experiment name params.yaml would give
    with mlflow.start_run(experiment_id=exp, run_name="visible-run"):
        mlflow.log_param("train.lr", 0.01)
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"  # webbrowser runs $BROWSER with the URL: record it instead of a browser
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    browser.chmod(0o755)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "kennel", "ui", "--port", str(port), "--open"], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src"), "BROWSER": f"{browser} %s"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/#/experiments/{exp}?workflowType=machine_learning"
    try:
        printed = server.stdout.readline() + server.stdout.readline()
        assert f"runs: {url}" in printed, printed
        search = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search"
        body = json.dumps({"experiment_ids": [exp]}).encode()
        deadline, reply = time.time() + 300, None  # a loaded CI machine takes minutes
        while time.time() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(search, body, {"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(request, timeout=5).read())
                break
            except OSError:
                time.sleep(1)
        assert reply is not None, server.stdout.read() if server.poll() is not None else "no answer"
        assert [r["info"]["run_name"] for r in reply["runs"]] == ["visible-run"]
        while time.time() < deadline and not opened.exists():
            time.sleep(0.5)
        assert opened.read_text().strip() == url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the UI's server processes too
        server.wait(timeout=120)


NO_MLFLOW = blocking("mlflow") + """
from kennel.cli.main import main
code = main(sys.argv[1:])
try:  # the guard itself can fail: it must still be in place after the command
    import mlflow
except ImportError as err:
    print(f"then: {err}")
sys.exit(code)
"""


def test_predict_from_a_model_file_imports_no_mlflow(tmp_path):
    """`kennel predict` with a model file runs with mlflow blocked: no command pays its import time needlessly."""
    import numpy as np
    from PIL import Image

    from kennel.model.file import save_model
    from kennel.model.network import build_model

    model, _ = build_model("resnet18", ["cat", "dog"], weights="none")
    save_model(model, tmp_path / "model.pt", size=32, arch="resnet18", mode="squash")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", NO_MLFLOW, "predict", "a.png", "--model", "model.pt"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "1 predicted, 0 failed" in out.stdout, out.stderr
    assert "then: mlflow is blocked" in out.stdout


def test_the_kennel_console_script_is_declared():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["kennel"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), function))
