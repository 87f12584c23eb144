"""README's "Use your own images" and "Reproduce a run", run as written there (parsed from README.md), in a fresh
clone with tiny images in data/raw/<class>/; and a run on images nobody versioned, which reproduce refuses."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from kennel.serve.cli import main as kennel
from tests.conftest import dvc, make_project, own_images, project_runs, readme_blocks, run, run_stages, small_params

pytestmark = pytest.mark.slow


def _shell(line: str, root, **subst) -> str:
    """One README command line, with its <placeholders> filled, through bash in ``root``; returns stdout."""
    for name, value in subst.items():
        line = line.replace(f"<{name}>", value)
    env = {**os.environ, "PYTHONPATH": str(root / "src")}  # this project's code, as an install would give
    out = run(["bash", "-c", line], root, check=False, timeout=900, env=env)
    assert out.returncode == 0, f"{line}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _commands(block: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_own_images_then_reproduce_a_run_an_experiment_and_a_commit(tmp_path):
    origin = make_project(tmp_path / "origin", small_params(**{"train.epochs": 1}))
    root = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(root)], tmp_path)
    dvc(["config", "--local", "core.autostage", "false"], root)  # nothing staged behind the README's back
    assert not (root / "data/raw").exists()  # nothing committed there: `dvc add data/raw` must work
    own_images(root / "data/raw")

    settings = readme_blocks("## Use your own images", "yaml")[0]
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in yaml.safe_load(settings).items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    use = readme_blocks("## Use your own images", "bash")[0]
    for line in _commands(use):
        _shell(line, root)
    assert run(["git", "status", "--porcelain", "--", "data", "params.yaml"], root).stdout == ""  # all committed
    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    _, (first,) = project_runs(root)
    assert first.data.tags["kennel.data_versioned"] == "true" and first.data.tags["git.dirty"] == "false"
    recorded = f"{json.loads((root / 'reports/metrics.json').read_text())['test_accuracy']:.6f}"

    # an experiment outside the workspace (the queue's own wiring: test_pipeline.py), then the workspace committed
    dvc(["exp", "run", "--temp", "-S", "train.lr=0.003", "--name", "own-lr"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "Result on our images"], root)

    reproduce = readme_blocks("## Reproduce a run", "bash")[0]
    lines = _commands(reproduce)
    assert [line.rsplit(" <", 1)[-1] for line in lines] == ["run id>", "experiment name>", "commit>"]
    commit = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root).stdout.split()
    exp_ref = next(r for r in refs if r.endswith("/own-lr"))
    exp_recorded = json.loads(run(["git", "show", f"{exp_ref}:reports/metrics.json"], root).stdout)["test_accuracy"]
    outs = [_shell(line, root, **{"run id": run_id, "experiment name": "own-lr", "commit": commit}) for line in lines]
    for out in outs:
        assert out.rstrip().endswith("\nreproduced") and "MISMATCH" not in out, out
    assert f"{exp_recorded:.6f}" in outs[1]  # the experiment's result, re-made
    assert recorded in outs[2]  # the commit's result is the first run's, re-made
    assert run(["git", "worktree", "list"], root).stdout.count("\n") == 1


def test_a_run_on_unversioned_images_is_flagged_and_reproduce_refuses_it(tmp_path, monkeypatch, capsys, caplog):
    root = make_project(tmp_path / "p", small_params(**{"data.source": "folder", "train.epochs": 1}))
    own_images(root / "data/raw")  # never `dvc add`-ed, never committed
    run_stages(root, ["prepare", "resize", "audit", "train"], monkeypatch)
    log = caplog.text + capsys.readouterr().err
    assert "the raw images are not versioned" in log and "`dvc add data/raw`" in log
    _, (train_run,) = project_runs(root)
    tags = train_run.data.tags
    assert tags["kennel.data_versioned"] == "false" and tags["git.dirty"] == "false"
    assert tags["kennel.data_warning"].startswith("not reproducible from its commit: data/raw is not versioned")
    monkeypatch.chdir(root)  # in-process: refused before anything runs
    assert kennel(["reproduce", train_run.info.run_id]) == 2
    refused = capsys.readouterr().err
    assert "not reproducible from its commit" in refused and "dvc add data/raw" in refused
    head = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    assert kennel(["reproduce", head]) == 2
    refused = capsys.readouterr().err
    assert "data/raw is not versioned" in refused, refused


def test_a_git_tracked_image_folder_gets_the_command_that_frees_it_for_dvc(tmp_path):
    root = make_project(tmp_path / "p", small_params(**{"data.source": "folder"}))
    own_images(root / "data/raw")
    run(["git", "add", "data/raw"], root)
    run(["git", "commit", "-qm", "images in git"], root)
    refused = dvc(["add", "data/raw"], root, check=False)
    assert refused.returncode != 0
    out = run(["python", "stages/prepare.py"], root, env={**os.environ, "PYTHONPATH": "src"})
    assert "git rm -r --cached data/raw && dvc add data/raw" in out.stderr
