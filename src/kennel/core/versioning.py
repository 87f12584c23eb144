"""Can a run be brought back from its commit? Git calls, and whether the raw images are versioned with it.

No mlflow here: `reproduce` and the stages ask these questions before any tracking is involved.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Collection, Sequence
from pathlib import Path, PurePosixPath

from kennel.core.errors import GitError

RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id


def git(args: Sequence[str], cwd: Path, check: bool = False) -> str:
    """``git args`` in ``cwd``: its stdout stripped, or '' when git fails or is missing (no repository is fine);
    with ``check``, a failure raises GitError with git's message instead."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        if check:
            raise GitError(f"git {' '.join(args)}: {err}") from None
        return ""
    if out.returncode and check:
        raise GitError(f"git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip() if out.returncode == 0 else ""


def base_commit(cwd: Path) -> str:
    """The commit a run's code is compared with: in a DVC experiment the workspace sits on a temporary commit, and
    the baseline is the one the repository keeps."""
    return os.environ.get("DVC_EXP_BASELINE_REV") or git(["rev-parse", "HEAD"], cwd)


def covering_dvc_file(raw_dir: str, tracked: Collection[str]) -> str | None:
    """The ``.dvc`` file among ``tracked`` (repository-relative paths) whose output is ``raw_dir`` or a folder above
    it (``data/raw.dvc`` covers ``data/raw/train.zip``)."""
    parts = PurePosixPath(raw_dir).parts
    for end in range(len(parts), 0, -1):
        candidate = f"{PurePosixPath(*parts[:end])}.dvc"
        if candidate in tracked:
            return candidate
    return None


def unversioned_reason(source: str, raw_dir: str, tracked: Collection[str], changed: Collection[str] = (),
                       untracked: Collection[str] = ()) -> str:
    """'' when checking out the commit (and ``dvc checkout``) brings back the raw images; else why not, with the
    command that fixes it. ``tracked``: the commit's files; ``changed``: files differing from it; ``untracked``: files
    under ``raw_dir`` that git does not track."""
    if source == "synthetic":
        return ""  # drawn from seed: the commit's params are the data
    raw = PurePosixPath(raw_dir)
    if raw.is_absolute() or ".." in raw.parts:
        return (f"data.raw_dir = {raw_dir} is outside the repository: move the images to data/raw, set "
                "data.raw_dir: data/raw, then `dvc add data/raw` and commit data/raw.dvc")
    raw_dir = str(raw)
    dvc_file = covering_dvc_file(raw_dir, tracked)
    if dvc_file:
        if dvc_file in changed:
            return f"{dvc_file} differs from the commit: `git add {dvc_file} && git commit`"
        return ""
    under = lambda f: f == raw_dir or f.startswith(f"{raw_dir}/")
    if any(map(under, tracked)) and not untracked and not any(map(under, changed)):
        return ""  # every file committed to git, unchanged
    return f"{raw_dir} is not versioned: `dvc add {raw_dir}`, then commit {raw_dir}.dvc"


def workspace_unversioned_reason(root: Path, source: str, raw_dir: str) -> str:
    """:func:`unversioned_reason` for the workspace at ``root`` (a stage's working directory)."""
    if source == "synthetic":
        return ""
    commit = base_commit(root)
    if not commit:
        return f"{root} is not a git repository with a commit: `git init`, `dvc add {raw_dir}` and commit"
    tracked = committed_files(root, commit)
    changed = set(git(["diff", "--name-only", commit], root).splitlines())
    untracked: list[str] = []
    if not PurePosixPath(raw_dir).is_absolute() and covering_dvc_file(raw_dir, tracked) is None:
        untracked = git(["ls-files", "--others", "--", raw_dir], root).splitlines()
    return unversioned_reason(source, raw_dir, tracked, changed, untracked)


def commit_unversioned_reason(root: Path, commit: str, source: str, raw_dir: str) -> str:
    """:func:`unversioned_reason` for ``commit`` of the repository at ``root``."""
    return unversioned_reason(source, raw_dir, committed_files(root, commit))


def committed_files(root: Path, commit: str) -> set[str]:
    """Every file path in ``commit`` (repository-relative)."""
    return set(git(["ls-tree", "-r", "--name-only", commit], root).splitlines())


def git_tracked_files(root: Path, folder: str) -> list[str]:
    """Files under ``folder`` that git tracks (`dvc add` refuses such a folder)."""
    return git(["ls-files", "--", folder], root).splitlines()
