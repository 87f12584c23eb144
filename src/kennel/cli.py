"""``python -m kennel ui``: the MLflow UI on the project's store, bound to 127.0.0.1 unless asked otherwise."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kennel.tracking import project_root, tracking_uri


def ui_command(root: Path, host: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", tracking_uri(root),
        "--host", host, "--port", str(port),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kennel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ui = commands.add_parser("ui", help="open the MLflow UI on this project's runs")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)

    root = project_root()
    uri = tracking_uri(root)
    if uri.startswith("sqlite:") and not (root / "mlflow.db").exists():
        print(f"kennel ui: no runs yet at {root / 'mlflow.db'}; run `dvc repro` first", file=sys.stderr)
        return 2
    print(f"kennel ui: {uri} at http://{args.host}:{args.port}", flush=True)
    cmd = ui_command(root, args.host, args.port)
    os.execv(cmd[0], cmd)  # replace this process so Ctrl-C and signals reach the server directly
    return 0  # not reached
