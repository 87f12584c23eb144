"""Near-copies in one split: the split assignment train and evaluate read (``data/audited``).

Each image's split is a hash of its content (prepare), so a re-encoded copy of a test photo lands in train about
as often as any other photo. With ``audit.group_splits`` a group's members all take the split of its member with
the smallest sha1: a fixed choice that depends on the group only, so adding unrelated images moves nothing. The
result is ``data/resized``'s index with the split column changed and a ``classes.json`` that points at
``data/resized``'s shards: no pixels are copied, and when nothing moves the index is byte for byte the resized one
(so train does not rerun).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.data.manifest import SPLITS, write_csv


def keep_groups_together(index: pd.DataFrame, groups: np.ndarray) -> pd.DataFrame:
    """``index`` (split, label, sha1, ...) with each group's members (``groups`` > 0) in its anchor's split."""
    out = index.copy()
    frame = pd.DataFrame({"group": groups, "sha1": index["sha1"].to_numpy(), "split": index["split"].to_numpy()})
    grouped = frame[frame["group"] > 0]
    anchors = grouped.sort_values("sha1").drop_duplicates("group").set_index("group")["split"]
    moved = grouped.index[grouped["split"].to_numpy() != anchors.loc[grouped["group"]].to_numpy()]
    out.loc[moved, "split"] = anchors.loc[frame.loc[moved, "group"]].to_numpy()
    return out


def write_audited(out_dir: Path, index: pd.DataFrame, resized_dir: Path, resized_meta: dict,
                  features: Path | None = None) -> dict:
    """``index.csv`` and ``classes.json`` of the audited splits, over ``resized_dir``'s shards (and, when given,
    the ``features`` cache of pretrained features training reads instead of computing them); returns the meta."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if stale.name not in ("index.csv", "classes.json"):
            stale.unlink()
    write_csv(index, out_dir / "index.csv")
    resized = pd.read_csv(Path(resized_dir) / "index.csv", dtype=str, keep_default_na=False)
    changed = index["split"].to_numpy() != resized["split"].to_numpy()
    moved = sorted(f"{s}:{split}" for s, split in zip(index["sha1"][changed], index["split"][changed], strict=True))
    # Training checkpoints and results belong to a split assignment: moved images give a new fingerprint.
    fingerprint = resized_meta.get("fingerprint", "")
    if moved:
        fingerprint = hashlib.sha256(f"{fingerprint}|{','.join(moved)}".encode()).hexdigest()
    meta = {**resized_meta, "counts": {s: int((index["split"] == s).sum()) for s in SPLITS},
            "fingerprint": fingerprint, "moved": len(moved),
            "shards": os.path.relpath(Path(resized_dir) / "shards", out_dir)}
    if features is not None:
        meta["features"] = os.path.relpath(features, out_dir)
    (out_dir / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
