"""Shared fixtures: tiny images made on the spot, shrunken params, and real DVC repos in temp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml

# What a project copy needs to run the pipeline: the files the benchmarks copy too (no torch: imported first).
from benchmarks.project import FILES as PROJECT_FILES
from benchmarks.project import copy_files

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist, share the cores between the workers: torch's OpenMP threads spin while they wait, and two
# workers with a thread per core each spent twice the CPU time for the same tests. Set before torch is imported;
# the subprocesses the tests start (dvc, stages) inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _CORES // _WORKERS))
BIN = Path(sys.executable).parent


def isolate(mp: pytest.MonkeyPatch, torch_home: Path) -> None:
    """No test downloads weights or talks to a tracking server it did not start."""
    mp.setenv("KENNEL_OFFLINE", "1")
    mp.setenv("TORCH_HOME", str(torch_home))
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        mp.delenv(var, raising=False)
    mp.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for who in ("AUTHOR", "COMMITTER"):
        mp.setenv(f"GIT_{who}_NAME", "kennel tests")
        mp.setenv(f"GIT_{who}_EMAIL", "tests@kennel.invalid")
    mp.setenv("DVC_NO_ANALYTICS", "1")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path_factory):
    isolate(monkeypatch, tmp_path_factory.mktemp("torch_home"))


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def small_params(**overrides) -> dict:
    """The shipped params.yaml shrunk to seconds: 32 px, a few images, one epoch, no pretrained weights."""
    p = default_params()
    p["data"]["synthetic_per_class"] = 12
    p["data"]["val_fraction"] = 0.25
    p["data"]["test_fraction"] = 0.25
    p["resize"]["size"] = 32
    p["model"]["weights"] = "none"
    p["train"]["epochs"] = 2
    p["train"]["batch_size"] = 8
    p["train"]["num_workers"] = 0
    p["train"]["device"] = "cpu"
    if overrides.get("data.source", "synthetic") != "synthetic":
        p["data"]["raw_dir"] = "data/raw"  # where the README puts a user's own images
    for dotted, value in overrides.items():
        section, _, key = dotted.rpartition(".")
        (p[section] if section else p)[key] = value
    return p


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def make_project(dest: Path, params: dict) -> Path:
    """A copy of the project as a fresh git + DVC repo, with ``params`` as its params.yaml, committed."""
    dest.mkdir(parents=True, exist_ok=True)
    copy_files(dest, PROJECT_FILES)
    write_params(dest / "params.yaml", params)
    run(["git", "init", "-q", "-b", "main"], dest)
    run([str(BIN / "dvc"), "init", "-q"], dest)
    run([str(BIN / "dvc"), "config", "core.autostage", "true"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "project"], dest)
    return dest


def dvc(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], cwd, **kw)


def make_params(**overrides):
    """``small_params`` as the typed, validated Params the library functions take."""
    from kennel.core.params import params_from_dict

    return params_from_dict(small_params(**overrides))


class Killed(Exception):
    """A training run stopped on purpose by ``kill_at``."""


def kill_at(epoch: int):
    """An ``on_epoch`` callback that kills the run when ``epoch`` is reported: epoch - 1 is checkpointed, ``epoch``
    is not (the report comes before the checkpoint)."""
    def on_epoch(result) -> None:
        if result.epoch == epoch:
            raise Killed(f"killed at epoch {epoch}")
    return on_epoch


@pytest.fixture(scope="module")
def resized_with(tmp_path_factory):
    """A factory of tiny resized datasets (synthetic, 32 px), each made once per test module."""
    made: dict[tuple[int, int], Path] = {}

    def make(per_class: int = 16, size: int = 32) -> Path:
        if (per_class, size) not in made:
            made[per_class, size] = build_dataset(tmp_path_factory.mktemp(f"data{per_class}"), per_class=per_class,
                                                  size=size)
        return made[per_class, size]

    return make


@pytest.fixture(scope="module")
def resized(resized_with) -> Path:
    """What the train stage reads: 16 synthetic images per class at 32 px."""
    return resized_with()


@pytest.fixture
def small_params_file(tmp_path) -> Path:
    return write_params(tmp_path / "params.yaml", small_params())


def build_dataset(root: Path, per_class: int = 16, size: int = 32, seed: int = 0, val: float = 0.25,
                  test: float = 0.25, source: str = "synthetic") -> Path:
    """Synthetic images (or, for ``source`` folder, ``root/raw/<class>/``) -> manifest (``root/manifest.csv``) ->
    resized arrays, with the library functions the stages use."""
    from kennel.data.images import load_array
    from kennel.data.manifest import account, write_csv
    from kennel.data.shards import write_splits
    from kennel.data.sources import find_images
    from kennel.data.validate import inspect_all

    candidates = find_images(source, root / "raw", out_dir=root / "prepared", seed=seed, per_class=per_class)
    acc = account(candidates, inspect_all(candidates, 8, 10**8), root, val, test, seed)
    write_csv(acc.manifest, root / "manifest.csv")
    write_splits(acc.manifest, root, size, root / "resized", partial(load_array, mode="squash"))
    return root / "resized"


def free_port() -> int:
    """A port nothing listens on right now, for servers the tests start (or expect to find missing)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_runs(root: Path):
    """(client, runs of the project's `kennel` experiment, oldest first) from the project's sqlite store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("kennel")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def write_image(path: Path, seed: int, label: str = "", size: tuple[int, int] = (48, 48)) -> Path:
    """A small photo-like file (JPEG or PNG by suffix): noise over a colour cue the classes ``red``/``cat`` (red) and
    others (blue) differ by, so a model can learn it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.zeros((size[1], size[0], 3), np.uint8)
    base[..., 0 if label in ("red", "cat") else 2] = 200
    noisy = np.clip(base + rng.integers(0, 50, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noisy).save(path)
    return path


def own_images(raw: Path, per_class: int = 12, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    """A user's images in ImageFolder layout: ``raw/<class>/<class>.<i>.jpg``."""
    for label in classes:
        for i in range(per_class):
            write_image(raw / label / f"{label}.{i}.jpg", 1000 * classes.index(label) + i, label)
    return raw


def readme_blocks(heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of README.md's section ``heading`` (its subsections included), in order."""
    import re

    text = (REPO / "README.md").read_text()
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n")
    end = re.search(rf"\n{level} ", text[start + 1:])
    section = text[start: start + 1 + end.start()] if end else text[start:]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)
