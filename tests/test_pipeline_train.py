"""The train stage for real: killed by a signal and rerun by DVC (launched by torchrun: two gloo processes under
`dvc repro` in test_pipeline.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time

import pytest
import torch

from kennel.core.params import load_params
from kennel.train.fine_tune import find_resumable
from tests.conftest import BIN, PIPELINE_EPOCHS, dvc, project_runs

pytestmark = pytest.mark.slow


def test_train_killed_by_signal_resumes_under_dvc_repro(pipeline, project_copy, caplog):
    straight, killed = pipeline.root, project_copy  # the shared run went straight through; its copy is killed
    epochs = PIPELINE_EPOCHS
    checkpoint = killed / "models/checkpoint.pt"
    checkpoint.unlink()  # the finished run's: the next one appears after the new run's first epoch
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "--force", "--single-item", "train"], cwd=killed,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGKILL)  # the whole tree: dvc and the stage, mid-training
    proc.wait()
    epoch_at_kill = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= epoch_at_kill < epochs

    out = dvc(["repro", "evaluate"], killed)  # the resumed model's metrics (export adds nothing to check here)
    assert f"resuming from checkpoint models/checkpoint.pt after epoch {epoch_at_kill}" in out.stdout + out.stderr
    a = torch.load(straight / "models/model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "models/model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((killed / "reports/metrics.json").read_text()) == \
        json.loads((straight / "reports/metrics.json").read_text())

    client, runs = project_runs(killed)
    assert len(runs) == 2  # the copied run, and the killed run that the resumed stage continued
    run = runs[1]
    assert run.info.status == "FINISHED" and run.data.tags["kennel.resumed_from_epoch"] == str(epoch_at_kill)
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")} == set(range(1, epochs + 1))
    assert "test_accuracy" in run.data.metrics
    for name in ("train_loss", "val_accuracy"):  # DVCLive: each epoch once, the MLflow numbers, the uninterrupted run's
        rows = [line.split("\t") for line in (killed / f"dvclive/plots/metrics/{name}.tsv").read_text().splitlines()]
        assert rows[0] == ["step", name] and [int(r[0]) for r in rows[1:]] == list(range(1, epochs + 1))
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert [float(r[1]) for r in rows[1:]] == pytest.approx([logged[step] for step in range(1, epochs + 1)])
        assert (killed / f"dvclive/plots/metrics/{name}.tsv").read_text() == \
            (straight / f"dvclive/plots/metrics/{name}.tsv").read_text()
    # the finished stage flags its checkpoint: forcing the stage again trains anew instead of resuming (what the
    # stage asks before it trains, here in-process)
    assert torch.load(checkpoint, weights_only=True)["complete"] is True
    caplog.set_level(logging.INFO)
    assert find_resumable(checkpoint, load_params(killed / "params.yaml"), killed / "data/audited") is None
    assert "belongs to a run that finished: starting fresh" in caplog.text, caplog.text
