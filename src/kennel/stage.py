"""What every stage's ``main`` shares: arguments, logging, params, and clear errors instead of tracebacks."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from kennel.config import ConfigError, Params, load_params
from kennel.data.sources import DataError

# Errors about the user's input: print the message (which names the file or key) and exit 2, no traceback.
# Stages add their own (train: WeightsError); importing kennel.model here would make prepare and resize depend on it.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError)


def run_stage(
    name: str, body: Callable[[Params], None], argv: Sequence[str] | None = None,
    extra_errors: tuple[type[Exception], ...] = (),
) -> int:
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"kennel {name} stage")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        params = load_params(args.params)
        body(params)
    except (*USER_ERRORS, *extra_errors) as err:
        print(f"kennel {name}: error: {err}", file=sys.stderr)
        return 2
    return 0
