"""DistributedDataParallel plumbing: launch under torchrun, join the process group, know who writes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files, checkpoints and MLflow."""
        return self.rank == 0


def launched() -> bool:
    """True inside a torchrun-started process (one of several, here or across nodes)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(nproc: int, script: str, argv: Sequence[str]) -> int:
    """Run ``script`` again as ``nproc`` processes on this machine under torchrun; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *argv]
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd)


def setup(device_type: str) -> Dist:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPUs); a single process otherwise."""
    if not launched():
        return Dist()
    ctx = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return ctx


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
