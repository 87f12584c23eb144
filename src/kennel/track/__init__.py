"""Everything MLflow, and only here: the store and run lifecycle, provenance, models and the registry.

``from kennel import track`` then ``track.open_run(...)``: the public names of the three modules in one place.
"""

import logging
import os

# Before mlflow is imported: no "Downloading artifacts" bars in stage output (logging a model reads files back).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from kennel.core.errors import TrackingUnavailable  # noqa: E402
from kennel.core.paths import tracking_uri  # noqa: E402
from kennel.track.store import (  # noqa: E402
    check_reachable,
    experiment_id,
    find_experiment,
    find_run,
    log_artifacts,
    log_dict,
    log_epoch,
    log_manifest,
    log_metrics,
    log_params,
    note,
    open_run,
    read_run_file,
    retry,
    run_exists,
    run_name,
    run_tag,
    run_tags_under,
    set_tags,
    store_lock,
    write_run_file,
)

# MLflow's own INFO lines (table creation, system metrics monitor start/stop) would drown kennel's; its warnings stay.
# After the import: importing mlflow sets its logger to INFO.
logging.getLogger("mlflow").setLevel(logging.WARNING)

# Models and provenance import torch and torchvision (3 s): loaded on first use, so the commands that only read the
# store (ui, compare, reproduce) start without them.
_LAZY = {name: "kennel.track.models" for name in ("CHAMPION", "Registration", "log_model", "register_and_promote")}
_LAZY |= {name: "kennel.track.provenance" for name in ("data_fingerprint", "provenance_tags")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CHAMPION", "Registration", "TrackingUnavailable", "check_reachable", "data_fingerprint", "experiment_id",
    "find_experiment", "find_run", "log_artifacts", "log_dict", "log_epoch", "log_manifest", "log_metrics", "log_model",
    "log_params", "note", "open_run", "provenance_tags", "read_run_file", "register_and_promote", "retry",
    "run_exists", "run_name", "run_tag", "run_tags_under", "set_tags", "store_lock", "tracking_uri", "write_run_file",
]
