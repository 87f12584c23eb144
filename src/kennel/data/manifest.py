"""The manifest: one row per kept image, every other file in the rejects with a reason, and stable splits.

found = kept + rejected, always. The reviewed decisions (``kennel.data.decisions``) come first: an excluded file
is a reject, a relabelled one carries its new label. Exact duplicates (same bytes) are then kept once; bytes that
appear under two classes are a label conflict and every copy is rejected (a relabel of those bytes resolves it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kennel.core.errors import DataError
from kennel.core.io import atomic_path
from kennel.data.decisions import EXCLUDED, NO_DECISIONS, Decisions
from kennel.data.sources import Candidate, relatives
from kennel.data.validate import DUPLICATE, LABEL_CONFLICT, Inspection

COLUMNS = ["path", "label", "split", "sha1", "width", "height", "format"]
REJECT_COLUMNS = ["path", "label", "reason", "detail"]
SPLITS = ("train", "val", "test")


@dataclass
class Accounting:
    manifest: pd.DataFrame  # kept images, COLUMNS
    rejects: pd.DataFrame  # REJECT_COLUMNS
    summary: dict
    paths: list[str]  # each candidate's path as the reports write it, in candidate order


def account(
    candidates: Sequence[Candidate], inspections: Sequence[Inspection | None], root: Path,
    val_fraction: float, test_fraction: float, seed: int, decisions: Decisions = NO_DECISIONS,
) -> Accounting:
    """Sort every candidate into kept or rejected, apply ``decisions``, drop duplicates and conflicts, and split
    what is kept.

    ``inspections[i]`` belongs to ``candidates[i]`` (None where the layout already rejected the file).
    """
    decisions.check_labels({c.label for c in candidates if c.label})
    kept, rejects, matched, moved = [], [], set(), {}
    paths = relatives([c.path for c in candidates], root)
    for cand, insp, path in zip(candidates, inspections, paths, strict=True):
        if cand.reason or insp is None:
            rejects.append((path, cand.label or "", cand.reason, ""))
        elif insp.reason:
            rejects.append((path, cand.label, insp.reason, insp.detail))
        elif excluded := decisions.excluded(path, insp.sha1):
            matched.add(excluded)
            rejects.append((path, cand.label, EXCLUDED, excluded.reason))
        else:
            label = cand.label
            if relabel := decisions.relabelled(insp.sha1):
                matched.add(relabel)
                label = relabel.label
                if label != cand.label:
                    moved[path] = f"{cand.label} -> {label}"
            kept.append((path, label, "", insp.sha1, insp.width, insp.height, insp.format))
    decisions.warn_unmatched(matched)
    df = pd.DataFrame(kept, columns=COLUMNS).sort_values("path", kind="stable")
    keep = pd.Series(True, index=df.index)
    repeated = df[df["sha1"].duplicated(keep=False)]  # grouping only these: a Python step per group is slow
    for _, group in repeated.groupby("sha1", sort=False):
        labels = sorted(group["label"].unique())
        if len(labels) > 1:
            keep[group.index] = False
            detail = f"same bytes labelled {', '.join(labels)}: {', '.join(group['path'])}"
            rejects += [(p, lab, LABEL_CONFLICT, detail) for p, lab in zip(group["path"], group["label"], strict=True)]
        else:
            keep[group.index[1:]] = False
            first = group["path"].iloc[0]
            rejects += [(p, lab, DUPLICATE, f"same bytes as {first}")
                        for p, lab in zip(group["path"].iloc[1:], group["label"].iloc[1:], strict=True)]
    df = assign_splits(df[keep], val_fraction, test_fraction, seed)
    rejected = pd.DataFrame(rejects, columns=REJECT_COLUMNS).sort_values(["reason", "path"], kind="stable")
    summary = _summary(candidates, df, rejected)
    relabelled = pd.Series([moved[p] for p in df["path"] if p in moved], dtype=str)
    summary["relabelled"] = len(relabelled)  # kept images whose label data/relabel.csv changed
    summary["relabelled_by_class"] = {k: int(v) for k, v in relabelled.value_counts().sort_index().items()}
    return Accounting(df.reset_index(drop=True), rejected.reset_index(drop=True), summary, paths)


def check_class_sizes(acc: Accounting, labels: Sequence[str], min_per_class: int) -> None:
    """Every class named by the layout keeps at least ``min_per_class`` images, and some images are for training."""
    counts = acc.manifest["label"].value_counts()
    for label in sorted(set(labels)):
        n = int(counts.get(label, 0))
        if n < min_per_class:
            rejected = int((acc.rejects["label"] == label).sum())
            raise DataError(f"class {label!r} kept {n} image(s) ({rejected} rejected, see reports/rejects.csv); "
                            f"data.min_per_class is {min_per_class}")
    if len(counts) < 2:
        raise DataError(f"kept images in {len(counts)} class(es): {list(counts.index)}; need at least 2")
    if not (acc.manifest["split"] == "train").any():
        raise DataError("no image fell into the train split; lower data.val_fraction / data.test_fraction")


def split_of(sha1: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of one image, from its content and the seed alone.

    A uniform number in [0, 1) from hash(seed, content): below test_fraction -> test, below test + val -> val.
    No other image is involved, so adding images never moves an existing one (test never leaks into train
    across dataset versions), and every class is sampled at the same rates (stratified in expectation).
    """
    u = int(hashlib.sha256(f"{seed}:{sha1}".encode()).hexdigest()[:16], 16) / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def assign_splits(df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    df = df.copy()
    df["split"] = [split_of(s, seed, val_fraction, test_fraction) for s in df["sha1"]]
    return df.sort_values(["split", "label", "path"], kind="stable").reset_index(drop=True)


def _summary(candidates: Sequence[Candidate], kept: pd.DataFrame, rejects: pd.DataFrame) -> dict:
    per_class: dict[str, dict] = {}
    for label in sorted({c.label for c in candidates if c.label} | set(kept["label"])):
        per_class[label] = {
            "found": sum(c.label == label for c in candidates),
            "kept": int((kept["label"] == label).sum()),
            "rejected": int((rejects["label"] == label).sum()),
            **{split: int(((kept["label"] == label) & (kept["split"] == split)).sum()) for split in SPLITS},
        }
    return {
        "found": len(candidates),
        "kept": len(kept),
        "rejected": len(rejects),
        "rejected_by_reason": {k: int(v) for k, v in rejects["reason"].value_counts().sort_index().items()},
        "per_class": per_class,
    }


def with_splits(summary: dict, index: pd.DataFrame) -> dict:
    """``summary`` with each class's split counts taken from ``index`` (split, label): the splits as the audit
    stage left them, which differ from prepare's where near-copies were moved into one split."""
    per_class = {label: {**c, **{split: int(((index["label"] == label) & (index["split"] == split)).sum())
                                 for split in SPLITS}} for label, c in summary["per_class"].items()}
    return {**summary, "per_class": per_class}


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """``df`` without its index, written whole or not at all."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_manifest(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: manifest not found; run the prepare stage first (dvc repro prepare)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise DataError(f"{path}: unknown split value(s) {bad}; allowed: {', '.join(SPLITS)}")
    return df

