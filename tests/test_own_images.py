"""README's "Use your own images", "Team setup" and "Reproduce a run", run as written there (parsed from README.md),
in a fresh clone with tiny images in data/raw/<class>/; reproduce restoring the raw images from the remote; and a run
on images nobody versioned, which reproduce refuses."""

from __future__ import annotations

import json
import os

import mlflow
import pytest
import yaml

from kennel.cli.main import main as kennel
from tests.conftest import (
    command_lines,
    dvc,
    make_project,
    own_images,
    project_runs,
    readme_blocks,
    run,
    run_stages,
    shell_line,
    small_params,
)

pytestmark = pytest.mark.slow


def test_readme_own_images_team_setup_and_reproduce_a_commit(tmp_path, monkeypatch, tracking_server):
    """README's "Use your own images", "Team setup" and "Reproduce a run" as written there: a fresh clone with tiny
    images in data/raw/<class>/, a folder DVC remote, a real tracking server both machines share, and a teammate's
    second clone that pulls the images and results instead of recomputing them and reproduces the commit. The other
    two lines of "Reproduce a run": <run id> in test_reproduce.py, <experiment name> in test_pipeline_queue.py."""
    origin = make_project(tmp_path / "origin", small_params(**{"train.epochs": 1}))
    root = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(root)], tmp_path)
    dvc(["config", "--local", "core.autostage", "false"], root)  # nothing staged behind the README's back
    assert not (root / "data/raw").exists()  # nothing committed there: `dvc add data/raw` must work
    own_images(root / "data/raw")
    uri = tracking_server.uri  # the invocation's server: this test alone uses its experiment "kennel"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # "on every machine that runs the pipeline"
    client = mlflow.MlflowClient(uri)

    settings = readme_blocks("## Use your own images", "yaml")[0]
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in yaml.safe_load(settings).items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for line in command_lines(readme_blocks("## Use your own images", "bash")[0]):
        shell_line(line, root)
    assert run(["git", "status", "--porcelain", "--", "data", "params.yaml"], root).stdout == ""  # committed
    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    first = client.get_run(run_id)
    assert first.data.tags["kennel.data_versioned"] == "true" and first.data.tags["git.dirty"] == "false"
    assert first.info.artifact_uri.startswith("mlflow-artifacts:")
    assert not (root / "mlflow.db").exists()  # the server has it all
    recorded = f"{json.loads((root / 'reports/metrics.json').read_text())['test_accuracy']:.6f}"

    # Team setup: a DVC remote in a folder, the data and outputs pushed, everything committed
    remote = tmp_path / "dvc-remote"
    dvc(["remote", "add", "-d", "storage", str(remote)], root)
    dvc(["push"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "Result on our images"], root)
    commit = run(["git", "rev-parse", "HEAD"], root).stdout.strip()

    reproduce = command_lines(readme_blocks("## Reproduce a run", "bash")[0])
    assert [line.rsplit(" <", 1)[-1] for line in reproduce] == ["run id>", "experiment name>", "commit>"]

    theirs = tmp_path / "theirs"  # a teammate's machine: a clone, its own (empty) DVC cache
    run(["git", "clone", "-q", str(root), str(theirs)], tmp_path)
    assert not (theirs / ".dvc/cache").exists() and not (theirs / "models/model.pt").exists()
    assert not (theirs / "data/raw").exists()
    remote.rename(tmp_path / "away")  # neither their cache nor the remote has the images: refused, with the fix
    refused = run(["bash", "-c", reproduce[2].replace("<commit>", commit)], theirs, check=False, timeout=600,
                  env={**os.environ, "PYTHONPATH": str(theirs / "src")})
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "data/raw (data/raw.dvc at" in refused.stderr and "dvc pull data/raw.dvc" in refused.stderr
    (tmp_path / "away").rename(remote)
    team = readme_blocks("## Team setup", "bash")[1]
    assert [c.split()[:2] for c in command_lines(team)][1:] == [
        ["dvc", "pull"], ["dvc", "status"], ["dvc", "repro"], ["python", "-m"]]
    dvc(["pull"], theirs)
    assert sorted(p.name for p in (theirs / "data/raw/cat").iterdir()) == sorted(
        p.name for p in (root / "data/raw/cat").iterdir())
    assert (theirs / "models/model.pt").read_bytes() == (root / "models/model.pt").read_bytes()
    status = dvc(["status"], theirs).stdout
    assert "up to date" in status, status
    again = dvc(["repro"], theirs).stdout
    assert "Running stage" not in again and "didn't change" in again, again
    out = shell_line(reproduce[2], theirs, commit=commit)
    assert out.rstrip().endswith("\nreproduced") and recorded in out, out  # the first run's result, re-made

    runs = client.search_runs([client.get_experiment_by_name("kennel").experiment_id])
    # the first run and the teammate's reproduction, on the one server
    assert sorted(r.data.tags.get("kennel.reproduces", "") for r in runs) == ["", commit]
    assert run(["git", "worktree", "list"], theirs).stdout.count("\n") == 1  # its worktree is gone


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


def test_reproduce_restores_the_images_from_the_remote_when_the_cache_lacks_them(tmp_path):
    from kennel.cli.reproduce import restore_inputs

    root = make_project(tmp_path / "p", small_params(**{"data.source": "folder"}))
    own_images(root / "data/raw", per_class=3)
    dvc(["add", "data/raw"], root)
    dvc(["remote", "add", "-d", "storage", str(tmp_path / "remote")], root)
    dvc(["push"], root)
    run(["git", "commit", "-qam", "images"], root)
    commit = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    tree = tmp_path / "tree"
    run(["git", "worktree", "add", "--detach", str(tree), commit], root)
    dvc(["cache", "dir", "--local", str(tmp_path / "empty-cache")], tree)
    restore_inputs(tree, commit, root, dict(os.environ))
    assert (tree / "data/raw/dog/dog.2.jpg").read_bytes() == (root / "data/raw/dog/dog.2.jpg").read_bytes()
    assert (tmp_path / "empty-cache").is_dir()  # fetched into the cache from the remote, then checked out
