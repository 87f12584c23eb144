"""What every stage's ``main`` shares: arguments, logging, params, and clear errors instead of tracebacks."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from kennel.core.errors import USER_ERRORS, report_user_error
from kennel.core.params import Params, load_params


def run_stage(
    name: str, body: Callable[[Params], None], argv: Sequence[str] | None = None,
) -> int:
    """Parse ``--params``, set up logging, run ``body(params)``; a user error (``USER_ERRORS``: the message names
    the file or key) prints one line and returns 2, no traceback."""
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"kennel {name} stage")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        params = load_params(args.params)
        body(params)
    except USER_ERRORS as err:
        return report_user_error(name, err)
    return 0
