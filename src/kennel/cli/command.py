"""What every command shares: its parser, the option types, and the project's MLflow names.

A command's ``run(argv)`` parses its options with :func:`command_parser` and raises a user error
(``kennel.core.errors.USER_ERRORS``) for anything else that is wrong; the dispatcher (``kennel.cli.main``) turns it
into one line on stderr and exit status 2. argparse's own errors exit 2 with the command's usage line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

from kennel.core.params import load_params

PARAMS = Path("params.yaml")
N = TypeVar("N", int, float)


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``python -m kennel NAME``: every command's usage line and help read the same way."""
    return argparse.ArgumentParser(prog=f"python -m kennel {name}", description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def number(kind: type[N], low: N, *, strict: bool = False) -> Callable[[str], N]:
    """An option type: ``kind`` (int or float) at least ``low`` (above it when ``strict``); anything else is
    argparse's error naming the option and the value."""
    what = f"{'a whole number' if kind is int else 'a number'} {'>' if strict else '>='} {low:g}"

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > low if strict else value >= low):  # NaN fails both comparisons
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = number(int, 1)  # batch sizes, counts, steps
positive_float = number(float, 0.0, strict=True)  # learning rates


class MlflowNames(NamedTuple):
    experiment: str
    registered_model: str


# kennel's own names (the shipped params.yaml's): an MLflow store browsed or compared outside a pipeline checkout
DEFAULT_MLFLOW = MlflowNames("kennel", "kennel")


def mlflow_names(root: Path) -> MlflowNames:
    """``mlflow.experiment`` and ``mlflow.registered_model`` of the project's params.yaml, checked like the stages
    check it (a bad file raises ConfigError naming the key); kennel's defaults where there is no params.yaml."""
    if not (root / PARAMS).is_file():
        return DEFAULT_MLFLOW
    mlflow = load_params(root / PARAMS).mlflow
    return MlflowNames(mlflow.experiment, mlflow.registered_model)
