"""Epoch checkpoints: everything needed to resume a fit exactly, written atomically, read with weights_only."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


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


def mark_complete(path: Path) -> None:
    """Flag the checkpoint of a run whose stage finished: rerunning the stage then trains anew, not resumes."""
    if path.exists():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        save_checkpoint(path, {**payload, "complete": True})
