"""Epoch checkpoints: everything needed to resume a fit exactly, written atomically, read with weights_only.

A :class:`Checkpointer` owns the file and its identity (the fingerprint of params, data and code), and both the
writing and the restoring of the payload, so the two sides stay symmetric."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import kennel
from kennel.core.io import atomic_path
from kennel.core.params import Params
from kennel.data.shards import read_meta
from kennel.train.loop import EpochResult, FitState
from kennel.train.probe import Probe

log = logging.getLogger(__name__)

# Params that change how fast, not what, a run trains (or only where it is recorded): a checkpoint stays valid.
NOT_IN_FINGERPRINT = {"train.num_workers", "train.compile", "data.workers", "resize.workers", "evaluate.tta"}


def fingerprint(params: Params, data_dir: Path) -> str:
    """Hash of everything that decides the result of training: params (less speed knobs), data and code."""
    relevant = {k: v for k, v in params.flat().items()
                if k not in NOT_IN_FINGERPRINT and not k.startswith(("mlflow.", "export."))}
    data = read_meta(data_dir).get("fingerprint", "")
    return hashlib.sha256(json.dumps([relevant, data, code_fingerprint()], sort_keys=True, default=str).encode()
                          ).hexdigest()


def code_fingerprint() -> str:
    """Hash of the kennel package's source: a fixed bug must not be resumed into an old run's weights."""
    package = Path(kennel.__file__).parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream a fit draws from, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "loader": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    generator.set_state(state["loader"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """tmp + rename: a kill mid-write leaves the previous checkpoint intact, never a torn one."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint at ``path`` if it is from an unfinished run with the same params, data and code
    (``fingerprint``), else None."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint is only a lost head start
        log.warning("checkpoint %s is unreadable (%s: %s): starting fresh", path, type(err).__name__, err)
        return None
    if payload.get("complete"):
        log.info("checkpoint %s belongs to a run that finished: starting fresh", path)
        return None
    if payload.get("fingerprint") != fingerprint:
        log.info("checkpoint %s was made with other params or data: not resuming, starting fresh", path)
        return None
    log.info("resuming from checkpoint %s after epoch %d", path, payload["epoch"])
    return payload


# What a finished run's checkpoint keeps: its last weights (a weights source, as model.pt is) and its record. The
# optimizer, the selected and starting weights and the RNG only serve a resume: three more copies of the model.
KEPT_WHEN_COMPLETE = ("fingerprint", "epoch", "phase", "model", "history", "best_epoch", "best_score", "mlflow_run_id")


def mark_complete(path: Path) -> None:
    """Flag the checkpoint of a run whose stage finished: rerunning the stage then trains anew, not resumes."""
    if path.exists():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        save_checkpoint(path, {k: payload[k] for k in KEPT_WHEN_COMPLETE if k in payload} | {"complete": True})


@dataclass
class Checkpointer:
    """The checkpoint of one run: written after every epoch (by rank 0), read back to resume it exactly."""

    path: Path
    fingerprint: str
    extra: dict = field(default_factory=dict)  # recorded as is (the train stage's MLflow run id)

    @classmethod
    def for_run(cls, path: Path, params: Params, data_dir: Path, extra: dict | None = None) -> Checkpointer:
        return cls(path, fingerprint(params, data_dir), dict(extra or {}))

    def resumable(self) -> dict | None:
        """The payload of an unfinished run with this fingerprint, or None: start fresh."""
        return load_checkpoint(self.path, self.fingerprint)

    def save(self, *, epoch: int, phase: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler, scaler, generator: torch.Generator, state: FitState) -> None:
        save_checkpoint(self.path, {
            "fingerprint": self.fingerprint, "epoch": epoch, "phase": phase,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler else None, "rng": rng_state(generator),
            "history": [asdict(r) for r in state.history], "best_epoch": state.best_epoch,
            "best_score": list(state.best_score), "best_state": state.best_state,
            "probe": probe_payload(state.probe), "start_state": state.start_state, "members": state.members,
            **self.extra,
        })


def probe_payload(probe: Probe | None) -> dict | None:
    """The probe as tensors and floats: what ``torch.load(weights_only=True)`` reads back."""
    if probe is None:
        return None
    return {**{k: float(getattr(probe, k)) for k in ("c", "val_accuracy", "val_loss", "test_accuracy")},
            "weight": torch.from_numpy(probe.weight), "bias": torch.from_numpy(probe.bias)}


def probe_from_payload(payload: dict | None) -> Probe | None:
    if payload is None:
        return None
    return Probe(payload["c"], payload["val_accuracy"], payload["val_loss"], payload["test_accuracy"],
                 payload["weight"].numpy(), payload["bias"].numpy())


def restore_run(payload: dict, model: torch.nn.Module, generator: torch.Generator) -> tuple[FitState, int]:
    """What :meth:`Checkpointer.save` wrote of the run as a whole: weights, RNG streams and the fit so far; returns
    the state and the first epoch still to train."""
    model.load_state_dict(payload["model"])
    set_rng_state(payload["rng"], generator)
    state = FitState([EpochResult(**r) for r in payload["history"]], payload["best_epoch"],
                     tuple(payload["best_score"]), payload["best_state"], probe_from_payload(payload.get("probe")),
                     payload.get("start_state"), members=list(payload.get("members") or []))
    return state, payload["epoch"] + 1
