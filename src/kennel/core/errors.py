"""Every error kennel raises about a user's input or setup, in one place: the stage runner and the command dispatcher
catch these, print the message (which names the file, key or reference) as one line and exit 2, without a traceback."""

from __future__ import annotations

import re
import sys


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, the key and what is allowed."""


class DataError(ValueError):
    """The data cannot be used as it is; the message names the folder, file or class."""


class WeightsError(RuntimeError):
    """The requested weights cannot be had or do not fit the arch; the message names the file and keys."""


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer; raised before any training starts."""


class GitError(RuntimeError):
    """A git command that had to succeed failed; the message is the command and git's own words."""


class ReproduceError(RuntimeError):
    """The reference cannot be reproduced; the message says why (unknown, dirty, missing commit)."""


class ModelRefError(ValueError):
    """A ``--model`` reference that cannot be resolved; the message names it and says why."""


class ExportError(RuntimeError):
    """An export that cannot be kept: the exported model disagrees with the PyTorch one (or int8 costs too much
    accuracy), or there is nothing to check it on; the message names the worst difference."""


# What a stage or command reports as a one-line error (exit 2) rather than a traceback.
USER_ERRORS = (ConfigError, DataError, WeightsError, TrackingUnavailable, GitError, ReproduceError, ModelRefError,
               ExportError, FileNotFoundError)
USER_ERROR_STATUS = 2  # argparse's own exit status for a bad command line


def report_user_error(name: str, err: BaseException | str) -> int:
    """Print ``kennel <name>: error: <message>`` on stderr and return the exit status; the stages and the commands
    share it, so every user error reads the same. Line breaks in the message (a YAML parser's report spans several)
    are folded: one error, one line."""
    message = re.sub(r"\s*\n\s*", " ", str(err).strip())
    print(f"kennel {name}: error: {message}", file=sys.stderr)
    return USER_ERROR_STATUS
