"""Queued experiments for real: `dvc exp run --queue` with code of their own, run side by side by two queue
workers into the project's sqlite MLflow store, then `dvc exp show`, `dvc plots diff` and `kennel reproduce
<experiment name>` on them. On a copy of the shared pipeline run (a file of its own: the longest test, scheduled
apart from test_pipeline.py's)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import yaml

from kennel.cli.reproduce import resolve
from tests.conftest import (
    BIN,
    command_lines,
    dvc,
    exp_refs,
    experiments_agree,
    project_runs,
    readme_blocks,
    run_cmd,
    wait_for_queue,
)

pytestmark = pytest.mark.slow


def test_queued_experiments_run_side_by_side_with_their_own_code_into_the_root_store(project_copy):
    root = project_copy
    run_cmd(root, "git", "add", "-A")  # the run's results committed, as a sweep starts from
    run_cmd(root, "git", "commit", "-qm", "first run")
    # Queued with code of their own: training code (the version it records, changed when it is imported), so each
    # experiment reruns train and evaluate over the data stages' cached outputs. Up to evaluate: what is checked
    # below ends at the registered model (export's wiring is the shared run's).
    queued_code = root / "src/kennel/train/__init__.py"
    original = queued_code.read_text()
    queued_code.write_text(original + 'import kennel\n\nkennel.__version__ += "+queued"\n')
    epochs = 8  # seconds of training to watch
    dvc(["exp", "run", "--queue", "evaluate", "-S", "train.lr=0.003", "-S", f"train.epochs={epochs}",
         "--name", "lr-three"], root)
    dvc(["exp", "run", "--queue", "evaluate", "-S", "train.lr=0.01", "-S", "train.batch_size=4", "--name", "lr-ten"],
        root)
    queued_code.write_text(original)  # the main workspace is back to the committed code
    # as in a fresh clone: no store yet, and two workers make first contact with it at once
    (root / "mlflow.db").unlink()
    shutil.rmtree(root / "mlruns")
    # not through captured pipes: the worker it starts would hold them open, and the call return only at the end
    subprocess.run([str(BIN / "dvc"), "queue", "start", "-j", "2"], cwd=root, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    seen_mid_run: list[int] = []  # steps of lr-three's dvclive/metrics.json, read while it trained
    deadline, refs_at, asked = time.time() + 900, 0.0, time.time()
    while time.time() < deadline:
        try:  # the experiments' workspaces: .dvc/tmp/exps/tmp<random>/, made and removed by DVC meanwhile
            lives = list((root / ".dvc" / "tmp" / "exps").glob("*/dvclive/metrics.json"))
        except OSError:
            lives = []
        for live in lives:
            try:
                if f"epochs: {epochs}\n" in (live.parents[1] / "params.yaml").read_text():
                    seen_mid_run.append(json.loads(live.read_text())["step"])
            except (OSError, ValueError, KeyError):
                pass  # being written
        if time.time() - refs_at > 0.5:  # an experiment's ref is made when it ends
            refs_at = time.time()
            if exp_refs(root) >= 2:
                break
        if time.time() - asked > 15:  # a failed experiment makes no ref: DVC's word, now and then
            status, asked = dvc(["queue", "status"], root).stdout, time.time()
            if "Queued" not in status and "Running" not in status and "Failed" in status:
                break
        time.sleep(0.05)
    status = wait_for_queue(root, 0, timeout=max(deadline - time.time(), 1))
    logs = "".join(dvc(["queue", "logs", name], root, check=False).stdout for name in ("lr-three", "lr-ten"))
    assert status.count("Success") == 2, status + logs
    assert "database is locked" not in logs
    # each ran its changed code's stages; the data stages' outputs came from the cache
    assert logs.count("Running stage 'train'") == logs.count("Running stage 'evaluate'") == 2, logs
    assert not any(f"Running stage '{s}'" in logs for s in ("prepare", "resize", "audit", "export")), logs
    # DVCLive wrote the metrics after each epoch, in the experiment's own workspace: `dvc exp show` reads them
    assert any(1 <= step < epochs for step in seen_mid_run), seen_mid_run

    client, runs = project_runs(root)
    by_exp = {}
    for name in ("lr-three", "lr-ten"):
        (by_exp[name],) = [r for r in runs if r.data.tags.get("dvc.exp_name") == name]  # one complete run each
    assert all(r.info.status == "FINISHED" and "kennel.model_uri" in r.data.tags for r in by_exp.values())
    run = by_exp["lr-three"]
    assert run.info.run_name == "lr-three"
    # the experiments' code, not the main workspace's
    assert {r.data.tags["kennel.version"] for r in by_exp.values()} == {"0.1.0+queued"}
    assert run.data.params["train.lr"] == "0.003" and "test_accuracy" in run.data.metrics
    head = run_cmd(root, "git", "rev-parse", "HEAD")
    assert run.data.tags["dvc.exp_baseline_rev"] == run.data.tags["git.commit"] == head
    # the queued code differed from the commit: recorded as dirty, with the file named
    assert run.data.tags["git.dirty"] == "true"
    assert run.data.tags["git.changed_files"] == "src/kennel/train/__init__.py"
    assert run.info.artifact_uri.startswith((root / "mlruns").as_uri())
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))

    shown = json.loads(dvc(["exp", "show", "--json"], root).stdout)
    text = json.dumps(shown)
    assert "lr-three" in text and "0.003" in text
    assert experiments_agree(shown, by_exp) == 2  # `dvc exp show` and MLflow agree on params and metrics
    exp = next(e for e in _revs(shown) if e.get("name") == "lr-three")["data"]
    live = exp["metrics"]["dvclive/metrics.json"]["data"]
    assert live["step"] == epochs and live["val_accuracy"] == pytest.approx(run.data.metrics["val_accuracy"])
    columns = [key for metrics in exp["metrics"].values() for key in metrics["data"]]
    assert not any("per_class" in c or isinstance(v, dict) for metrics in exp["metrics"].values()
                   for c, v in metrics["data"].items()), columns
    # every run registered a version; the champion is the best, whichever finished first
    assert len(client.search_model_versions("name='kennel'")) == len(runs) == 2
    champion = client.get_model_version_by_alias("kennel", "champion")
    assert client.get_run(champion.run_id).data.metrics["test_accuracy"] == max(
        r.data.metrics["test_accuracy"] for r in client.search_runs([runs[0].info.experiment_id]))

    # README's "python -m kennel reproduce <experiment name>" finds the experiment's commit (its params, its code) and
    # recorded result. The rerun and comparison that follow are the same for every kind of reference: run for real
    # from a run id in test_reproduce.py and from a commit in test_own_images.py.
    line = command_lines(readme_blocks("## Reproduce a run", "bash")[0])[1]
    assert line.split()[:4] == ["python", "-m", "kennel", "reproduce"] and line.endswith("<experiment name>")
    target = resolve("lr-ten", root)
    recorded = json.loads(run_cmd(root, "git", "show", f"{_exp_ref(root, 'lr-ten')}:reports/metrics.json"))
    assert target.commit == run_cmd(root, "git", "rev-parse", _exp_ref(root, "lr-ten"))
    assert target.recorded["accuracy"] == recorded["test_accuracy"] == by_exp["lr-ten"].data.metrics["test_accuracy"]
    committed = yaml.safe_load(run_cmd(root, "git", "show", f"{target.commit}:params.yaml"))
    assert committed["train"]["lr"] == 0.01 and committed["train"]["batch_size"] == 4
    assert '"+queued"' in run_cmd(root, "git", "show", f"{target.commit}:src/kennel/train/__init__.py")

    # the experiment's training curves over the workspace's, overlaid by `dvc plots diff`
    diff = json.loads(dvc(["plots", "diff", "lr-three", "--json"], root).stdout)["data"]
    for title in ("Training loss", "Validation loss", "Accuracy"):
        (plot,) = diff[title]
        assert plot["type"] == "vega" and set(plot["revisions"]) == {"workspace", "lr-three"}
        rows = plot["content"]["data"]["values"]
        assert {r["rev"] for r in rows} == {"workspace", "lr-three"}
        assert sorted({int(r["step"]) for r in rows if r["rev"] == "lr-three"}) == list(range(1, epochs + 1))


def _revs(shown):
    for entry in shown:
        yield entry
        for exp in entry.get("experiments") or []:
            yield from exp.get("revs", [])


def _exp_ref(root, name: str) -> str:
    refs = run_cmd(root, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
    return next(r for r in refs if r.endswith(f"/{name}"))
