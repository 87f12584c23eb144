"""The audit's findings as files: one row per image in a group of near-copies, and a few numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kennel.data.vectors import FeatureCache

COLUMNS = ["group", "path", "label", "split", "hash_split", "similarity", "sha1"]


def duplicate_table(groups: np.ndarray, index: pd.DataFrame, audited: pd.DataFrame, paths: list[str],
                    features: FeatureCache) -> pd.DataFrame:
    """Per grouped image: its group, manifest path, label, split (audited) and the split its hash gave, and its
    similarity to the group's first row (the member with the smallest sha1, whose split the group keeps)."""
    members = np.flatnonzero(groups)
    rows = pd.DataFrame({
        "group": groups[members], "path": np.asarray(paths, dtype=object)[members],
        "label": index["label"].to_numpy()[members], "split": audited["split"].to_numpy()[members],
        "hash_split": index["split"].to_numpy()[members], "sha1": index["sha1"].to_numpy()[members],
        "position": members,
    }).sort_values(["group", "sha1"], kind="stable")
    first = rows.drop_duplicates("group").set_index("group")["position"]
    rows["similarity"] = similarity(features, rows["position"].to_numpy(), first.loc[rows["group"]].to_numpy())
    rows = rows.sort_values(["group", "similarity", "sha1"], ascending=[True, False, True], kind="stable")
    return rows[COLUMNS].reset_index(drop=True)


def similarity(features: FeatureCache, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of embeddings, or 1 - (differing hash bits) / (hash bits), straight or mirrored, whichever
    is closer."""
    if not len(a):
        return np.empty(0)
    va, vb = features.take(a), features.take(b)
    if va.dtype != np.uint8:
        return np.round((va.astype(np.float32) * vb.astype(np.float32)).sum(axis=1).astype(np.float64), 4)
    half = va.shape[1] // 2
    straight = np.unpackbits(va[:, :half] ^ vb[:, :half], axis=1).sum(axis=1)
    mirrored = np.unpackbits(va[:, half:] ^ vb[:, :half], axis=1).sum(axis=1)
    return np.round(1 - np.minimum(straight, mirrored) / (8 * half), 4)


def audit_metrics(table: pd.DataFrame, images: int, moved: int) -> dict[str, int]:
    """Flat numbers for ``dvc metrics``: groups, and of those the leaks (members whose hash splits differ) and the
    conflicts (members labelled differently); images moved to keep groups in one split."""
    by_group = table.groupby("group")
    return {
        "audit_images": int(images),
        "audit_duplicate_groups": int(by_group.ngroups),
        "audit_duplicate_images": int(len(table)),
        "audit_leak_groups": int((by_group["hash_split"].nunique() > 1).sum()),
        "audit_conflicting_groups": int((by_group["label"].nunique() > 1).sum()),
        "audit_moved_images": int(moved),
    }
