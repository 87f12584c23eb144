"""``python -m kennel ui``: the MLflow UI on this project's runs, bound to 127.0.0.1 unless asked otherwise.

The experiment it opens is params.yaml's ``mlflow.experiment`` (``kennel`` in a folder without a params.yaml).
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
import webbrowser
from collections.abc import Sequence
from pathlib import Path

from kennel.cli.command import command_parser, mlflow_names
from kennel.core.paths import project_root, tracking_uri


def ui_command(root: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(root),
            "--host", host, "--port", str(port)]


def ui_url(host: str, port: int, experiment_id: str | None = None) -> str:
    """The UI's address; with an experiment, its runs view (without ``workflowType=machine_learning`` MLflow 3
    opens an experiment on a GenAI overview of traces and token usage)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{host}:{port}"
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else base


def open_when_up(url: str, timeout: float = 120) -> None:
    """In a child process: wait until the server answers, open ``url`` in the browser, exit."""
    if os.fork():
        return
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url.split("/#", 1)[0] + "/health", timeout=2).read()
                webbrowser.open(url)
                break
            except OSError:
                time.sleep(0.5)
    finally:
        os._exit(0)


def run(argv: Sequence[str]) -> int:
    parser = command_parser("ui", __doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--open", action="store_true", help="open the runs view in the browser once it is up")
    args = parser.parse_args(argv)
    root = project_root()
    experiment = mlflow_names(root).experiment
    uri = tracking_uri(root)
    if uri.startswith("sqlite:") and not (root / "mlflow.db").exists():
        raise FileNotFoundError(f"{root / 'mlflow.db'}: no runs yet; run `dvc repro` first")
    # mlflow and torch take 5 s to import: only once the refusals above have passed
    from kennel.track import find_experiment

    url = ui_url(args.host, args.port, find_experiment(root, experiment))
    print(f"kennel ui: {uri}\n  runs: {url}", flush=True)
    if args.open:
        open_when_up(url)
    cmd = ui_command(root, args.host, args.port)
    # MLflow's GenAI job runners (judges, scorers) serve no classifier runs: without them the UI starts in 15 s
    # instead of 20 on two cores, with 2 processes instead of 10
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(cmd[0], cmd)  # replace this process so Ctrl-C and signals reach the server directly
    return 0  # not reached
