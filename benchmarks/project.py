"""A copy of kennel's pipeline as a fresh, committed git + DVC repo: what the benchmarks run `dvc repro` in."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FILES = ("dvc.yaml", "params.yaml", "stages", "src/kennel", "data/synthetic/README.md", "data/.gitignore",
         "data/exclude.csv", "data/relabel.csv", ".dvcignore", ".gitignore")


def copy_files(dest: Path, files: Sequence[str] = FILES) -> None:
    """``files`` (and folders, bytecode left out) of this checkout into ``dest``, at the same relative paths."""
    for rel in files:
        src, dst = REPO / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


def make_project(
    dest: Path, params: Callable[[dict], dict], ref: str | None = None, files: Sequence[str] = FILES,
) -> Path:
    """``files`` of this checkout (or of commit ``ref``) in ``dest``, params.yaml replaced by ``params`` of the
    copied one, then ``git init``, ``dvc init`` and one commit."""
    dest.mkdir(parents=True, exist_ok=True)
    if ref is None:
        copy_files(dest, files)
    else:
        archive = subprocess.run(["git", "archive", ref, *files], cwd=REPO, capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(dest, filter="data")
    copied = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(params(copied), sort_keys=False))
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=kennel", "-c", "user.email=kennel@localhost", "commit", "-qm", "project"]):
        out = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed in {dest}:\n{out.stdout}\n{out.stderr}")
    return dest
