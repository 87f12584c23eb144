"""`python -m kennel reproduce` on a real git + DVC repo: README's `reproduce <run id>` rerunning a run whose recorded
result no longer matches, and refusals. Exact reproductions: a commit in test_own_images.py, an experiment in
test_pipeline_queue.py."""

from __future__ import annotations

import os

import pytest

from kennel.cli.main import main as kennel
from tests.conftest import REPO, command_lines, copy_project, project_runs, readme_blocks, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(pipeline, tmp_path_factory):
    """A copy of the shared pipeline run with its result committed."""
    root = copy_project(pipeline.root, tmp_path_factory.mktemp("repro") / "project")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first result"], root)
    return root


def test_a_mismatch_exits_non_zero_and_the_rerun_leaves_nothing_behind(project):
    client, runs = project_runs(project)
    original = runs[0]
    accuracy = original.data.metrics["test_accuracy"]
    client.log_metric(original.info.run_id, "test_accuracy", -1.0)  # the latest value is what the run records now
    line = command_lines(readme_blocks("## Reproduce a run", "bash")[0])[0]  # README's, with the run id
    out = run(["bash", "-c", line.replace("<run id>", original.info.run_id)], project, check=False, timeout=900,
              env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 1 and "MISMATCH" in out.stdout and "NOT reproduced" in out.stdout, out.stdout + out.stderr
    assert f"{accuracy:.6f}" in out.stdout  # the rerun made the original accuracy again
    assert not list((project.parent).glob("kennel-reproduce-*"))
    assert run(["git", "worktree", "list"], project).stdout.count("\n") == 1  # the worktree is gone
    _, runs = project_runs(project)
    assert runs[-1].data.tags["kennel.reproduces"] == original.info.run_id  # the rerun is on record too


def test_refusals(project, monkeypatch, capsys):
    client, runs = project_runs(project)
    exp_id = runs[0].info.experiment_id
    monkeypatch.chdir(project)  # in-process: refused before anything runs
    dirty = client.create_run(exp_id, tags={"git.commit": runs[0].data.tags["git.commit"], "git.dirty": "true",
                                            "git.changed_files": "src/kennel/engine.py"})
    assert kennel(["reproduce", dirty.info.run_id]) == 2
    assert "uncommitted changes (src/kennel/engine.py)" in capsys.readouterr().err
    missing = client.create_run(exp_id, tags={"git.commit": "0" * 40, "git.dirty": "false"})
    client.log_metric(missing.info.run_id, "test_accuracy", 0.5)
    assert kennel(["reproduce", missing.info.run_id]) == 2
    err = capsys.readouterr().err
    assert f"commit {'0' * 40}" in err and "not in this repository" in err
    assert kennel(["reproduce", "no-such-thing"]) == 2
    assert "neither an MLflow run id" in capsys.readouterr().err
