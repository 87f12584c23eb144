"""train: fine-tune a torchvision classifier on the resized arrays; log params, curves and the model to an MLflow run.

Resumes from ``models/checkpoint.pt`` when an unfinished run left it with the same params, data and code
(continuing the same MLflow run), and launches itself under torchrun when ``train.nproc`` > 1.
"""

from __future__ import annotations

import logging
import os
import sys

from kennel import track
from kennel.core.device import resolve_device
from kennel.core.params import Params
from kennel.core.paths import AUDITED, CHECKPOINT, project_root
from kennel.core.stage import run_stage
from kennel.data.shards import read_meta
from kennel.model.weights import read_weights
from kennel.track.training import train_and_log
from kennel.train import distributed
from kennel.train.fine_tune import find_resumable, train

log = logging.getLogger("kennel.train")


def train_stage(params: Params, argv: list[str]) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 talks to MLflow: fail before any training if it cannot
        track.check_reachable(track.tracking_uri(project_root()))
    if params.model.weights not in ("auto", "none"):
        # a weights file that does not fit stops here: nothing trained, nothing written, no MLflow run
        read_weights(params.model.arch, params.model.weights, len(read_meta(AUDITED)["classes"]))
    if params.train.nproc > 1 and not distributed.launched():
        code = distributed.relaunch(params.train.nproc, __file__, argv)
        if code:
            raise SystemExit(code)
        return
    ctx = distributed.setup(resolve_device(params.train.device).type)
    try:
        resume = find_resumable(CHECKPOINT, params, AUDITED)
        if ctx.is_main:
            train_and_log(params, project_root(), resume=resume, ctx=ctx)
        else:
            train(params, AUDITED, checkpoint=CHECKPOINT, resume=resume, ctx=ctx)
    finally:
        distributed.cleanup()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_stage("train", lambda params: train_stage(params, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
