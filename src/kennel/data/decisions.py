"""A person's reviewed decisions about the data, kept in git and applied by prepare: files to leave out
(``data/exclude.csv``) and labels to correct (``data/relabel.csv``). Both are dependencies of the prepare stage,
so a review is a commit and a rerun.

``data/exclude.csv`` (path, sha1, reason): a row with a sha1 excludes those bytes wherever they are (a moved or
copied file stays excluded); a row with only a path excludes the file at that path as the manifest writes it.
``data/relabel.csv`` (sha1, label, reason): every image with those bytes gets ``label``, a class the data already
has. ``reason`` may be empty or left out; other columns are notes for people and are ignored. A row that matches
no file is reported and skipped (normal after the data changed); a row that cannot be read stops prepare, naming
its line.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kennel.core.errors import DataError
from kennel.core.paths import EXCLUDE, RELABEL

log = logging.getLogger(__name__)

EXCLUDE_COLUMNS = ["path", "sha1", "reason"]
RELABEL_COLUMNS = ["sha1", "label", "reason"]
EXCLUDED = f"excluded by {EXCLUDE.as_posix()}"  # the reason in reports/rejects.csv; the row's reason is the detail
_SHA1 = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Row:
    """One decision: ``line`` is its line in ``file``, for messages."""

    file: str
    line: int
    sha1: str
    path: str = ""  # exclude only
    label: str = ""  # relabel only
    reason: str = ""

    def where(self) -> str:
        return f"{self.file}, line {self.line}"


@dataclass(frozen=True)
class Decisions:
    exclude: Sequence[Row] = ()
    relabel: Sequence[Row] = ()
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for row in (*reversed(self.exclude), *reversed(self.relabel)):  # the first of repeated rows answers
            self._index[_key(row)] = row

    def excluded(self, path: str, sha1: str) -> Row | None:
        """The exclude row that names these bytes, else the one that names this path (sha1-less rows only)."""
        return self._index.get(("exclude", sha1)) or self._index.get(("path", path))

    def relabelled(self, sha1: str) -> Row | None:
        return self._index.get(("relabel", sha1))

    def check_labels(self, classes: Collection[str]) -> None:
        """Every relabel names a class of the data (an image cannot be moved into a class nothing else has)."""
        for row in self.relabel:
            if row.label not in classes:
                raise DataError(f"{row.where()}: label {row.label!r} is not a class of the data; allowed: "
                                f"{', '.join(sorted(classes))}")

    def warn_unmatched(self, matched: set[Row]) -> None:
        """Rows no file matched: stale after the data changed, or a typo; reported, not fatal."""
        for row in (*self.exclude, *self.relabel):
            if self._index[_key(row)] not in matched:
                what = f"sha1 {row.sha1}" if row.sha1 else f"path {row.path}"
                log.warning("%s: %s matches no image found; remove the row if the file is gone", row.where(), what)


def _key(row: Row) -> tuple[str, str]:
    if row.label:
        return ("relabel", row.sha1)
    return ("exclude", row.sha1) if row.sha1 else ("path", row.path)


NO_DECISIONS = Decisions()


def read_decisions(exclude: Path = EXCLUDE, relabel: Path = RELABEL) -> Decisions:
    """Both files, checked row by row; a missing file holds no decisions."""
    excludes = [Row(str(exclude), n, _sha1(r, exclude, n), path=r["path"], reason=r["reason"])
                for n, r in _rows(exclude, EXCLUDE_COLUMNS, required=[])]
    for row in excludes:
        if not row.sha1 and not row.path:
            raise DataError(f"{row.where()}: names no file; give a path, a sha1 or both")
    relabels, seen = [], {}
    for n, r in _rows(relabel, RELABEL_COLUMNS, required=["sha1", "label"]):
        row = Row(str(relabel), n, _sha1(r, relabel, n), label=r["label"], reason=r["reason"])
        if row.sha1 in seen and seen[row.sha1].label != row.label:
            raise DataError(f"{row.where()}: sha1 {row.sha1} relabelled {row.label!r}, but line "
                            f"{seen[row.sha1].line} says {seen[row.sha1].label!r}; keep one")
        seen.setdefault(row.sha1, row)
        relabels.append(row)
    return Decisions(excludes, relabels)


def _sha1(row: dict, path: Path, line: int) -> str:
    sha1 = row["sha1"].lower()
    if sha1 and not _SHA1.fullmatch(sha1):
        raise DataError(f"{path}, line {line}: sha1 {row['sha1']!r} is not 40 hexadecimal digits (the sha1 column of "
                        "the manifest or the rejects)")
    return sha1


def _rows(path: Path, columns: Sequence[str], required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, the ``columns`` of the row, stripped) for each non-empty row of ``path``."""
    if not path.exists():
        log.debug("%s: not there; no decisions from it", path)
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header and c != "reason"]
            if missing:
                raise DataError(f"{path}: header {','.join(header) or '(empty)'} lacks column(s) "
                                f"{', '.join(missing)}; expected {','.join(columns)} (reason is optional)")
            rows = []
            for record in reader:
                if None in record:
                    raise DataError(f"{path}, line {reader.line_num}: more fields than the header has "
                                    "(quote a value that holds a comma)")
                row = {c: (record.get(c) or "").strip() for c in columns}
                for c in required:
                    if not row[c]:
                        raise DataError(f"{path}, line {reader.line_num}: {c} is empty; required: "
                                        f"{', '.join(required)}")
                rows.append((reader.line_num, row))
            return rows
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
