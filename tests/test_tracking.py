"""MLflow linking: provenance tags, reachability, registry promotion; on real sqlite stores in temp dirs."""

import sys
import time

import mlflow
import numpy as np
import pytest
import torch

from kennel import track
from tests.conftest import free_port, run


def test_provenance_tags_name_commit_branch_dirtiness_and_data(tmp_path, monkeypatch):
    run(["git", "init", "-q", "-b", "trial"], tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/prepared\n      md5: abc.dir\n"
        "  resize:\n    outs:\n    - path: data/resized\n      md5: def.dir\n")
    run(["git", "add", "-A"], tmp_path)
    run(["git", "commit", "-qm", "x"], tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)
    tags = track.provenance_tags(tmp_path)
    head = run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip()
    assert tags["git.commit"] == tags["mlflow.source.git.commit"] == "f" * 40  # an experiment's baseline
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    assert track.provenance_tags(tmp_path)["git.commit"] == head
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", head)
    assert tags["git.branch"] == "trial" and tags["git.dirty"] == "false" and "git.changed_files" not in tags
    assert tags["dvc.exp_name"] == "brisk-lark"
    assert tags["dvc.data.data/prepared"] == "abc.dir" and tags["dvc.data.data/resized"] == "def.dir"
    assert tags["torch.version"] == torch.__version__ and tags["host.device"] and "cuda.version" in tags
    (tmp_path / "params.yaml").write_text("seed: 2\n")  # params are recorded on the run: not dirty
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")  # nor is a rewritten lock
    assert track.provenance_tags(tmp_path)["git.dirty"] == "false"
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    (tmp_path / "train.py").write_text("print('changed code')\n")
    run(["git", "add", "train.py"], tmp_path)
    tags = track.provenance_tags(tmp_path)
    assert tags["git.dirty"] == "true" and tags["git.changed_files"] == "train.py"


def test_unreachable_server_fails_fast_naming_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(track.TrackingUnavailable, match=f"{uri} .*unreachable"):
        track.check_reachable(uri)
    assert time.perf_counter() - start < 10
    track.check_reachable("sqlite:///anything.db")  # local stores need no check


def _run_with_model(root, accuracy: float | None) -> tuple[str, str]:
    with track.open_run(root, "registry-test") as run_id:
        if accuracy is not None:
            track.log_metrics({"test_accuracy": accuracy})
        uri = track.log_model(torch.nn.Linear(2, 2), np.zeros((2, 2), np.float32))
    return run_id, uri


def test_champion_moves_only_to_a_better_version(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    regs = []
    for acc in (0.5, 0.7, 0.6, 0.7):
        run_id, uri = _run_with_model(tmp_path, acc)
        regs.append(track.register_and_promote(tmp_path, run_id, uri, "pets", promote=True))
    assert [r.version for r in regs] == ["1", "2", "3", "4"]
    assert [r.promoted for r in regs] == [True, True, False, False]  # a tie does not move it
    assert "0.6 <= champion v2's 0.7" in regs[2].reason
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("pets", "champion").version) == "2"
    version = client.get_model_version("pets", "2")
    assert version.tags["run_id"] == version.run_id and version.tags["test_accuracy"] == "0.7"

    captured = capfd.readouterr()
    assert "Successfully registered" not in captured.err and "Created version" not in captured.err

    run_id, uri = _run_with_model(tmp_path, 0.99)
    off = track.register_and_promote(tmp_path, run_id, uri, "pets", promote=False)
    assert not off.promoted and str(client.get_model_version_by_alias("pets", "champion").version) == "2"


def test_experiments_kennel_creates_open_on_the_runs_view(tmp_path):
    """MLflow 3's UI shows an experiment of kind custom_model_development on its runs, not a GenAI overview."""
    (tmp_path / ".dvc").mkdir()
    exp_id = track.experiment_id("pets", tmp_path)
    assert mlflow.MlflowClient().get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert track.find_experiment(tmp_path, "pets") == exp_id and track.find_experiment(tmp_path, "no") is None


def test_retry_rides_out_transient_store_errors_and_raises_others():
    calls = []

    def insert_once_raced():
        calls.append(1)
        if len(calls) == 1:  # what a tracking server on PostgreSQL answers the loser of a concurrent insert
            raise RuntimeError('BAD_REQUEST: duplicate key value violates unique constraint "dataset_pk"')
        return "linked"

    assert track.retry(insert_once_raced) == "linked" and len(calls) == 2

    def refused():
        calls.append(1)
        raise ValueError("bad value")

    with pytest.raises(ValueError, match="bad value"):
        track.retry(refused)
    assert len(calls) == 3  # not retried


def test_registry_chatter_is_dropped_and_anything_else_passed_on(capfd):
    def noisy():
        print("Successfully registered model 'pets'.", file=sys.stderr)
        print("Created version '3' of model 'pets'.", file=sys.stderr)
        print("WARNING something the user should see", file=sys.stderr)
        return 3

    assert track.models._without_registry_chatter(noisy) == 3
    err = capfd.readouterr().err
    assert "something the user should see" in err and "Successfully" not in err and "Created version" not in err
