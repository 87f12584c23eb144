"""README's Team setup, for real, with a user's own images: a DVC remote in a folder, a tracking server, and a second
clone that pulls the images and results instead of recomputing them and reproduces the committed result; and
reproduce restoring the raw images from the remote, or refusing when nothing has them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import REPO, dvc, make_project, own_images, run, small_params

pytestmark = pytest.mark.slow


def test_a_teammate_pulls_the_results_and_reproduces_them(tmp_path, mlflow_server, monkeypatch):
    uri, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # both machines share the tracking server
    remote = tmp_path / "dvc-remote"
    # the team's own experiment and registered model on the server this test process shares
    mine = make_project(tmp_path / "mine", small_params(**{"data.source": "folder", "train.epochs": 1,
                                                           "mlflow.experiment": "kennel-team",
                                                           "mlflow.registered_model": "kennel-team"}))
    own_images(mine / "data/raw")
    dvc(["add", "data/raw"], mine)
    dvc(["remote", "add", "-d", "storage", str(remote)], mine)
    dvc(["repro"], mine)
    dvc(["push"], mine)
    run(["git", "add", "-A"], mine)
    run(["git", "commit", "-qm", "first result"], mine)
    commit = run(["git", "rev-parse", "HEAD"], mine).stdout.strip()
    recorded = {k.removeprefix("test_"): v for k, v in json.loads((mine / "reports/metrics.json").read_text()).items()}

    theirs = tmp_path / "theirs"  # another machine: a clone, its own (empty) DVC cache
    run(["git", "clone", "-q", str(mine), str(theirs)], tmp_path)
    assert not (theirs / ".dvc/cache").exists() and not (theirs / "models/model.pt").exists()
    assert not (theirs / "data/raw").exists()
    remote.rename(tmp_path / "away")  # neither their cache nor the remote has the images: refused, with the fix
    refused = _reproduce(theirs, commit)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "data/raw (data/raw.dvc at" in refused.stderr and "dvc pull data/raw.dvc" in refused.stderr
    (tmp_path / "away").rename(remote)
    dvc(["pull"], theirs)
    assert sorted(p.name for p in (theirs / "data/raw/cat").iterdir()) == sorted(
        p.name for p in (mine / "data/raw/cat").iterdir())
    assert (theirs / "models/model.pt").read_bytes() == (mine / "models/model.pt").read_bytes()
    status = dvc(["status"], theirs).stdout
    assert "up to date" in status, status
    again = dvc(["repro"], theirs).stdout
    assert "Running stage" not in again and "didn't change" in again, again

    out = _reproduce(theirs, commit)
    assert out.returncode == 0 and "reproduced" in out.stdout, out.stdout + out.stderr
    assert f"{recorded['accuracy']:.6f}" in out.stdout

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kennel-team").experiment_id])
    assert len(runs) == 2  # the original, and the reproduction made on the other machine, on the same server
    assert sorted(r.data.tags.get("kennel.reproduces", "") != "" for r in runs) == [False, True]


def _reproduce(root, ref):
    return subprocess.run([sys.executable, "-m", "kennel", "reproduce", ref], cwd=root, capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def test_reproduce_restores_the_images_from_the_remote_when_the_cache_lacks_them(tmp_path):
    from kennel.serve.reproduce import restore_inputs

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
