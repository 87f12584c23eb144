"""`python -m kennel reproduce` on real git + DVC repos: by run id, commit and experiment; refusals; mismatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, dvc, make_project, project_runs, run, small_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from tests.conftest import isolate

    mp = pytest.MonkeyPatch()
    isolate(mp, tmp_path_factory.mktemp("torch_home"))
    root = make_project(tmp_path_factory.mktemp("repro"), small_params(**{"train.epochs": 1}))
    dvc(["repro"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first result"], root)
    yield root
    mp.undo()


def _reproduce(root, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "kennel", "reproduce", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)


def test_reproduce_a_run_id_exactly(project):
    client, runs = project_runs(project)
    original = runs[0]
    out = _reproduce(project, original.info.run_id)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reproduced" in out.stdout and "MISMATCH" not in out.stdout
    assert f"{original.data.metrics['test_accuracy']:.6f}" in out.stdout
    assert not list((project.parent).glob("kennel-reproduce-*"))
    assert run(["git", "worktree", "list"], project).stdout.count("\n") == 1  # the worktree is gone
    _, runs = project_runs(project)
    assert runs[-1].data.tags["kennel.reproduces"] == original.info.run_id  # the rerun is on record too


def test_reproduce_a_commit_and_an_experiment(project):
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    out = _reproduce(project, head)
    assert out.returncode == 0, out.stdout + out.stderr
    dvc(["exp", "run", "-S", "train.lr=0.003", "--name", "faster"], project)
    out = _reproduce(project, "faster")
    assert out.returncode == 0, out.stdout + out.stderr
    recorded = json.loads(run(["git", "show", "refs/exps/" + _exp_ref(project, "faster") + ":reports/metrics.json"],
                              project).stdout)["test_accuracy"]
    assert f"{recorded:.6f}" in out.stdout


def _exp_ref(root, name):
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root).stdout.split()
    return next(r for r in refs if r.endswith("/" + name)).removeprefix("refs/exps/")


def test_mismatch_exits_non_zero(project):
    client, runs = project_runs(project)
    run_id = runs[0].info.run_id
    client.log_metric(run_id, "test_accuracy", -1.0)  # the latest value is what the run records now
    out = _reproduce(project, run_id)
    assert out.returncode == 1 and "MISMATCH" in out.stdout and "NOT reproduced" in out.stdout


def test_refusals(project):
    client, runs = project_runs(project)
    exp_id = runs[0].info.experiment_id
    dirty = client.create_run(exp_id, tags={"git.commit": runs[0].data.tags["git.commit"], "git.dirty": "true",
                                            "git.changed_files": "src/kennel/engine.py"})
    out = _reproduce(project, dirty.info.run_id)
    assert out.returncode == 2 and "uncommitted changes (src/kennel/engine.py)" in out.stderr
    missing = client.create_run(exp_id, tags={"git.commit": "0" * 40, "git.dirty": "false"})
    client.log_metric(missing.info.run_id, "test_accuracy", 0.5)
    out = _reproduce(project, missing.info.run_id)
    assert out.returncode == 2 and f"commit {'0' * 40}" in out.stderr and "not in this repository" in out.stderr
    out = _reproduce(project, "no-such-thing")
    assert out.returncode == 2 and "neither an MLflow run id" in out.stderr
