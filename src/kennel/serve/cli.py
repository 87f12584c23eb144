"""``python -m kennel ui | predict | compare | reproduce | lr-find | review``: the commands around the pipeline."""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request
import webbrowser
from collections.abc import Sequence
from pathlib import Path

import yaml

from kennel.core.paths import project_root, tracking_uri

USAGE = """usage: python -m kennel {ui,predict,compare,reproduce,lr-find,review} ...

  ui          the MLflow UI on this project's runs, bound to 127.0.0.1
  predict     classify image files or folders with a trained model
  compare     runs side by side: params that differ, metrics, the test images whose predictions changed
  reproduce   rerun a past run, commit or DVC experiment and compare its metrics
  lr-find     learning-rate range test on the train split: plot, suggested train.lr, an MLflow run
  review      the audit's suspects as drafts of data/relabel.csv and data/exclude.csv, to edit and commit

Run `python -m kennel COMMAND --help` for a command's options."""


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``python -m kennel NAME``: every command's usage line and help read the same way."""
    return argparse.ArgumentParser(prog=f"python -m kennel {name}", description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def fail(name: str, message: str) -> int:
    """A command's user error: one line on stderr naming the command, and exit status 2 (argparse's own)."""
    print(f"kennel {name}: error: {message}", file=sys.stderr)
    return 2


def ui_command(root: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(root),
            "--host", host, "--port", str(port)]


def ui_url(host: str, port: int, experiment_id: str | None = None) -> str:
    """The UI's address; with an experiment, its runs view (without ``workflowType=machine_learning`` MLflow 3
    opens an experiment on a GenAI overview of traces and token usage)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{host}:{port}"
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else base


def experiment_name(root: Path) -> str:
    """``mlflow.experiment`` of the project's params.yaml (``kennel`` when it cannot be read)."""
    return _mlflow_param(root, "experiment", "kennel")


def registered_model_name(root: Path) -> str:
    """``mlflow.registered_model`` of the project's params.yaml (``kennel`` when it cannot be read)."""
    return _mlflow_param(root, "registered_model", "kennel")


def _mlflow_param(root: Path, key: str, default: str) -> str:
    try:
        return str(yaml.safe_load((root / "params.yaml").read_text())["mlflow"][key])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return default


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


def ui(argv: Sequence[str]) -> int:
    parser = command_parser("ui", "MLflow UI on this project's runs")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--open", action="store_true", help="open the runs view in the browser once it is up")
    args = parser.parse_args(argv)
    root = project_root()
    uri = tracking_uri(root)
    if uri.startswith("sqlite:") and not (root / "mlflow.db").exists():
        return fail("ui", f"no runs yet at {root / 'mlflow.db'}; run `dvc repro` first")
    from kennel.track import find_experiment  # mlflow: only this command needs it

    url = ui_url(args.host, args.port, find_experiment(root, experiment_name(root)))
    print(f"kennel ui: {uri}\n  runs: {url}", flush=True)
    if args.open:
        open_when_up(url)
    cmd = ui_command(root, args.host, args.port)
    os.execv(cmd[0], cmd)  # replace this process so Ctrl-C and signals reach the server directly
    return 0  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "ui":
        return ui(rest)
    if command == "predict":
        from kennel.serve.predict import predict_cli

        return predict_cli(rest)
    if command == "compare":
        from kennel.serve.compare import compare_cli

        return compare_cli(rest)
    if command == "reproduce":
        from kennel.serve.reproduce import reproduce_cli

        return reproduce_cli(rest)
    if command == "lr-find":
        from kennel.serve.lr_find import lr_find_cli

        return lr_find_cli(rest)
    if command == "review":
        from kennel.serve.review import review_cli

        return review_cli(rest)
    print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2
