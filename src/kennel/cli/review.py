"""``python -m kennel review``: the audit's suspects as draft decisions for a person to edit.

Reads ``reports/audit/label_issues.csv`` (and ``reports/audit/near_duplicates.csv`` when the audit wrote one) and
writes ``data/relabel.draft.csv`` (each suspect with the suggested label) and ``data/exclude.draft.csv`` (all but
one image of each near-duplicate group), in the columns of ``data/relabel.csv`` and ``data/exclude.csv``. A person
keeps the rows they agree with (a suspect that belongs to no class goes to the exclude draft), then ``--apply``
appends the drafts to the reviewed files, which are never written otherwise, and the person commits them. Images
the reviewed files already decide are left out of the drafts, and an existing draft is only replaced with
``--force``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kennel.audit.labels import CSV_COLUMNS, flagged
from kennel.cli.command import command_parser, positive_int
from kennel.core.errors import DataError
from kennel.core.paths import (
    EXCLUDE,
    EXCLUDE_DRAFT,
    LABEL_ISSUES,
    NEAR_DUPLICATES,
    RELABEL,
    RELABEL_DRAFT,
    project_root,
)
from kennel.data.decisions import EXCLUDE_COLUMNS, RELABEL_COLUMNS, Decisions, Row, read_decisions

TOP = 20  # suspects and near-duplicate groups per draft: what a person reviews in one sitting
COMMIT = f"  git add {EXCLUDE} {RELABEL} && git commit -m 'Review the data' && dvc repro"
DUPLICATE_COLUMNS = ["group", "path", "sha1", "similarity"]


def relabel_draft(issues: pd.DataFrame, decided: Decisions, top: int = TOP) -> pd.DataFrame:
    """The first ``top`` suspects not decided yet (the report's ranking: cleanlab's flagged images first, then the
    rest by score), relabelled to the suggested label; the reason says why."""
    open_ = issues[[not _decided(decided, p, s) for p, s in zip(issues["path"], issues["sha1"], strict=True)]]
    open_ = open_[open_["suggested_label"] != open_["given_label"]]  # nothing to relabel where the model agrees
    mark = flagged(open_)
    rows = [(r.sha1, r.suggested_label, f"label issue{'' if m else ' (not flagged)'}: given {r.given_label}, "
             f"suggested {r.suggested_label}, score {float(r.score):.3f}, {r.split}: {r.path}")
            for r, m in zip(open_.head(top).itertuples(), mark, strict=False)]
    return pd.DataFrame(rows, columns=RELABEL_COLUMNS)


def exclude_draft(duplicates: pd.DataFrame | None, decided: Decisions, top: int = TOP) -> pd.DataFrame:
    """All but the first image of each of the first ``top`` near-duplicate groups, unless already decided."""
    rows = []
    if duplicates is not None:
        for _, group in list(duplicates.groupby("group", sort=False))[:top]:
            kept = group.iloc[0]
            for r in group.iloc[1:].itertuples():
                if not _decided(decided, r.path, r.sha1):
                    rows.append((r.path, r.sha1, f"near duplicate of {kept['path']} (similarity "
                                                 f"{float(r.similarity):.3f})"))
    return pd.DataFrame(rows, columns=EXCLUDE_COLUMNS)


def _decided(decided: Decisions, path: str, sha1: str) -> bool:
    return bool(decided.excluded(path, sha1) or decided.relabelled(sha1))


def read_report(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err}); rerun the audit stage (dvc repro audit)") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: lacks column(s) {', '.join(missing)}; rerun the audit stage (dvc repro audit)")
    return df


def apply_drafts(drafts: Decisions, decided: Decisions, exclude: Path, relabel: Path) -> tuple[int, int]:
    """Append the rows of the (edited) drafts to the reviewed files, leaving out rows they already hold; returns
    (exclude rows, relabel rows) appended. A draft that relabels bytes the reviewed file labels otherwise stops it."""
    excludes = [r for r in drafts.exclude if not decided.excluded(r.path, r.sha1)]
    relabels = []
    for row in drafts.relabel:
        known = decided.relabelled(row.sha1)
        if known and known.label != row.label:
            raise DataError(f"{row.where()}: relabels {row.sha1} to {row.label!r}, but {known.where()} says "
                            f"{known.label!r}; keep one")
        if not known:
            relabels.append(row)
    _append(exclude, excludes, EXCLUDE_COLUMNS)
    _append(relabel, relabels, RELABEL_COLUMNS)
    return len(excludes), len(relabels)


def _append(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> None:
    """``rows`` at the end of the CSV file ``path``, in its own header's columns (``columns`` for a new file)."""
    if not rows:
        return
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    header = next(csv.reader([text.splitlines()[0]])) if text.strip() else list(columns)
    with open(path, "a", newline="", encoding="utf-8") as f:
        if not text.strip():
            f.write(",".join(header) + "\n")
        elif not text.endswith("\n"):
            f.write("\n")
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore", lineterminator="\n")
        writer.writerows({"path": r.path, "sha1": r.sha1, "label": r.label, "reason": r.reason} for r in rows)


def run(argv: Sequence[str]) -> int:
    parser = command_parser("review", __doc__.split("\n\n")[1].replace("``", ""))
    parser.add_argument("--top", type=positive_int, default=TOP,
                        help=f"suspects and near-duplicate groups (default {TOP})")
    parser.add_argument("--force", action="store_true", help="replace drafts that are already there")
    parser.add_argument("--apply", action="store_true",
                        help="after editing: append the drafts' rows to data/exclude.csv and data/relabel.csv "
                             "(rows they hold already are left out) and remove the drafts")
    args = parser.parse_args(argv)
    root = project_root()
    decided = read_decisions(root / EXCLUDE, root / RELABEL)
    if args.apply:
        apply(decided, root)
    else:
        draft(decided, root, args.top, args.force)
    return 0


def apply(decided: Decisions, root: Path) -> None:
    """``--apply``: the edited drafts appended to the reviewed files, then removed."""
    if not (root / EXCLUDE_DRAFT).exists() and not (root / RELABEL_DRAFT).exists():
        raise FileNotFoundError(f"{EXCLUDE_DRAFT}, {RELABEL_DRAFT}: no draft to apply; run "
                                "`python -m kennel review` first")
    drafts = read_decisions(root / EXCLUDE_DRAFT, root / RELABEL_DRAFT)
    excluded, relabelled = apply_drafts(drafts, decided, root / EXCLUDE, root / RELABEL)
    for path in (EXCLUDE_DRAFT, RELABEL_DRAFT):
        (root / path).unlink(missing_ok=True)
    print(f"{EXCLUDE}: {excluded} row(s) added\n{RELABEL}: {relabelled} row(s) added\n\nNext:\n{COMMIT}")


def draft(decided: Decisions, root: Path, top: int, force: bool) -> None:
    """The drafts of the audit's first ``top`` suspects and near-duplicate groups, and what to do next."""
    if not (root / LABEL_ISSUES).exists():
        raise FileNotFoundError(f"{LABEL_ISSUES}: not found; run the audit stage first (dvc repro audit)")
    issues = read_report(root / LABEL_ISSUES, CSV_COLUMNS)
    duplicates = read_report(root / NEAR_DUPLICATES, DUPLICATE_COLUMNS) if (root / NEAR_DUPLICATES).exists() else None
    drafts = [(relabel_draft(issues, decided, top), RELABEL_DRAFT, "label suspect(s)"),
              (exclude_draft(duplicates, decided, top), EXCLUDE_DRAFT, "near duplicate(s)")]
    for frame, path, _ in drafts:  # both checked before either is written
        if len(frame) and (root / path).exists() and not force:
            raise DataError(f"{path}: a draft is already there (edited?); apply it (--apply), delete it, or pass "
                            "--force to replace it")
    for frame, path, what in drafts:
        if len(frame):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(root / path, index=False)
        print(f"{path}: {len(frame)} {what}" if len(frame) else f"{what}: none to review")
    if duplicates is None:
        print(f"({NEAR_DUPLICATES} not found: no near-duplicate drafts)")
    if any(len(frame) for frame, _, _ in drafts):
        print(f"\nNext: look at each row (the grid: {LABEL_ISSUES.with_suffix('.png')}) and delete the rows you "
              f"disagree with; a suspect that belongs to no class goes to {EXCLUDE_DRAFT} as ',<sha1>,<reason>'. "
              f"Then:\n  python -m kennel review --apply\n{COMMIT}")
