"""``python -m kennel COMMAND ...`` (the ``kennel`` console script): one table of the commands, from which both the
usage text and the dispatch are made, and the one place a command's user error becomes a line on stderr."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from kennel.core.errors import USER_ERROR_STATUS, USER_ERRORS, report_user_error

# name -> (module with ``run(argv) -> int``, one line of help). A command's module is imported only when it runs:
# `predict` from a model file never pays for mlflow, and no command imports another.
COMMANDS: dict[str, tuple[str, str]] = {
    "ui": ("kennel.cli.ui", "the MLflow UI on this project's runs, bound to 127.0.0.1"),
    "predict": ("kennel.cli.predict", "classify image files or folders with a trained model"),
    "export": ("kennel.cli.export",
               "the model as an ONNX file (fp32 or int8), checked against PyTorch before it is written"),
    "compare": ("kennel.cli.compare",
                "runs side by side: params that differ, metrics, the test images whose predictions changed"),
    "reproduce": ("kennel.cli.reproduce", "rerun a past run, commit or DVC experiment and compare its metrics"),
    "lr-find": ("kennel.cli.lr_find",
                "learning-rate range test on the train split: plot, suggested train.lr, an MLflow run"),
    "review": ("kennel.cli.review",
               "the audit's suspects as drafts of data/relabel.csv and data/exclude.csv, to edit and commit"),
}
HELP = ("-h", "--help")


def usage() -> str:
    width = max(map(len, COMMANDS)) + 3
    lines = [f"  {name:<{width}}{summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join([f"usage: python -m kennel {{{','.join(COMMANDS)}}} ...", "", *lines, "",
                      "Run `python -m kennel COMMAND --help` for a command's options."])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names; returns the exit status: 0, a command's own (reproduce: 1 on a mismatch), or
    2 for a user error (one line on stderr, no traceback) and for argparse's errors (its usage line and message)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest = (argv[0], argv[1:]) if argv else ("", [])
    if name not in COMMANDS:
        return _usage(name)
    command = importlib.import_module(COMMANDS[name][0])
    try:
        return command.run(rest)
    except USER_ERRORS as err:
        return report_user_error(name, err)
    except SystemExit as done:  # argparse has printed its usage line and message (or the help: code 0)
        return done.code if isinstance(done.code, int) else 0 if done.code is None else USER_ERROR_STATUS


def _usage(name: str) -> int:
    if name in HELP:
        print(usage())
        return 0
    print(usage(), file=sys.stderr)
    if name:
        print(f"kennel: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
    return USER_ERROR_STATUS
