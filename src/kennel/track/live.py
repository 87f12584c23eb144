"""DVCLive beside the MLflow run: the training curves and the train metrics as files DVC reads (``dvclive/``),
written after every epoch, so `dvc exp show` and `dvc plots` follow a queued experiment while it trains.

The same numbers as the MLflow run, at the same step (the epoch). DVCLive neither writes dvc.yaml nor saves
experiments (kennel's dvc.yaml declares its files, `dvc exp run` makes the experiment), and it touches no MLflow.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from dvclive import Live

from kennel.train.fine_tune import TrainResult
from kennel.train.loop import EpochResult

# DVCLive announces itself at INFO on every start; kennel's stage log says what matters.
logging.getLogger("dvclive").setLevel(logging.WARNING)


class LiveLog:
    """One training run's DVCLive files. ``resume_epoch``: the checkpoint's epoch when the run resumes; steps after
    it (epochs reported before a kill but not checkpointed) are dropped, as training repeats them."""

    def __init__(self, directory: Path, resume_epoch: int | None = None):
        if resume_epoch is not None:
            keep_steps(directory / "plots" / "metrics", resume_epoch)
        self.live = Live(str(directory), resume=resume_epoch is not None, save_dvc_exp=False, dvcyaml=None,
                         report=None)

    def log_epoch(self, result: EpochResult) -> None:
        self.live.step = result.epoch
        for name, value in result.metrics().items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def finish(self, result: TrainResult) -> None:
        """The summary `dvc exp show` compares runs by: the kept epoch and its val accuracy, the time spent."""
        kept = result.kept_val_accuracy()  # none when the kept weights learnt from val (train.refit members)
        self.live.summary.update(selected_epoch=result.selected_epoch,
                                 **({} if kept is None or math.isnan(kept) else {"selected_val_accuracy": kept}),
                                 train_seconds=round(sum(r.seconds for r in result.history), 1),
                                 **{k: v for k, v in result.baseline_metrics().items() if k != "baseline_c"})
        self.live.make_summary()


def keep_steps(folder: Path, last: int) -> None:
    """Drop the rows of every metric history in ``folder`` whose step is after ``last``."""
    for path in sorted(folder.rglob("*.tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows:
            continue
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, rows[0].keys(), delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(r for r in rows if int(r["step"]) <= last)
