"""The pipeline with data.source: folder over a small made-up tree with broken files, then adding images."""

from __future__ import annotations

import hashlib
import json

import mlflow
import pandas as pd
import pytest

from kennel.data.manifest import split_of
from kennel.data.synthetic import render
from tests.conftest import dvc, leaking_copy, make_project, run_stages, small_params, write_image

pytestmark = pytest.mark.slow


def test_folder_source_end_to_end(tmp_path, monkeypatch):
    params = small_params(**{"data.source": "folder", "data.min_per_class": 5, "data.val_fraction": 0.2,
                             "data.test_fraction": 0.2})
    root = make_project(tmp_path / "project", params)
    raw = root / "data/raw"
    for i in range(30):
        label = ("red", "blue")[i % 2]
        write_image(raw / label / ("sub" if i % 3 else "") / f"{i}.png", i, label)
    (raw / "red" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(40))
    (raw / "blue" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (raw / ".gitkeep").write_bytes(b"")  # a stray file outside the class folders
    # a drawing and a mirrored, resized, re-encoded copy of it that the content hash puts in another split
    render("cat", 0, 1).save(raw / "red" / "drawing.png")
    split = split_of(hashlib.sha1((raw / "red/drawing.png").read_bytes()).hexdigest(), params["seed"], 0.2, 0.2)
    (raw / "red" / "drawing copy.jpg").write_bytes(leaking_copy(render("cat", 0, 1), split, params["seed"], 0.2, 0.2))
    # in-process: what each stage writes is checked here; that `dvc repro` runs them is checked in test_pipeline.py
    run_stages(root, ["prepare", "resize", "audit", "train", "evaluate", "export"], monkeypatch)
    dvc(["commit", "--force"], root)  # the lock, as a `dvc repro` would have written it

    # the audit found the leak and put the copy in the original's split (or the other way round): the manifest
    # keeps the hash splits, the audited index that train and evaluate read does not
    audit = json.loads((root / "reports/audit/metrics.json").read_text())
    assert (audit["audit_duplicate_groups"], audit["audit_leak_groups"], audit["audit_moved_images"]) == (1, 1, 1)
    pair = pd.read_csv(root / "reports/audit/near_duplicates.csv")
    assert set(pair["path"]) == {"data/raw/red/drawing.png", "data/raw/red/drawing copy.jpg"}
    assert pair["hash_split"].nunique() == 2 and pair["split"].nunique() == 1
    audited = pd.read_csv(root / "data/audited/index.csv").set_index("sha1")["split"]
    assert set(audited[pair["sha1"]]) == set(pair["split"])
    tested = set(pd.read_csv(root / "reports/predictions.csv")["path"])
    assert (pair["split"].iloc[0] == "test") == (set(pair["path"]) <= tested) and len(set(pair["path"]) & tested) != 1
    assert len(tested) == json.loads((root / "data/audited/classes.json").read_text())["counts"]["test"]

    summary = json.loads((root / "reports/data_summary.json").read_text())
    assert (summary["found"], summary["kept"], summary["rejected"]) == (35, 32, 3)  # + .gitkeep
    rejects = (root / "reports/rejects.csv").read_text()
    assert "data/raw/red/Thumbs.db,red,not an image" in rejects
    assert "data/raw/blue/broken.jpg,blue,truncated or corrupt" in rejects
    assert "data/raw/.gitkeep,,not in a class folder" in rejects
    assert json.loads((root / "data/resized/classes.json").read_text())["classes"] == ["blue", "red"]
    metrics = json.loads((root / "reports/evaluation.json").read_text())["test"]
    assert set(metrics["per_class"]) == {"blue", "red"}

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("kennel").experiment_id])
    assert run.data.metrics["data_found"] == 35 and run.data.metrics["data_rejected"] == 3
    assert run.data.metrics["audit_moved_images"] == 1
    assert {a.path for a in client.list_artifacts(run.info.run_id, "data")} == {
        "data/data_summary.json", "data/rejects.csv", "data/class_counts.csv", "data/samples.png", "data/sizes.png",
        "data/class_counts.png", "data/rejected.png"}

    # new images: prepare reruns, and no existing image changes split
    manifest = (root / "data/prepared/manifest.csv").read_text().splitlines()
    for i in range(30, 40):
        label = ("red", "blue")[i % 2]
        write_image(raw / label / f"{i}.png", i, label)
    status = json.loads(dvc(["status", "--json"], root).stdout)
    assert set(status) == {"prepare"}  # the images folder is its dependency
    run_stages(root, ["prepare"], monkeypatch)
    after = set((root / "data/prepared/manifest.csv").read_text().splitlines())
    assert set(manifest) <= after and len(after) == len(manifest) + 10


def test_prepare_keeps_its_reports_when_a_class_is_too_small(tmp_path, monkeypatch):
    from stages.prepare import main

    params = small_params(**{"data.source": "folder", "data.min_per_class": 3})
    raw = tmp_path / "data/raw"
    for i in range(5):
        write_image(raw / "red" / f"{i}.png", i, "red")
    write_image(raw / "blue" / "0.png", 100, "blue")
    (raw / "blue" / "1.jpg").write_bytes(b"")
    from tests.conftest import write_params

    write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    assert "data/raw/blue/1.jpg,blue,empty file" in (tmp_path / "reports/rejects.csv").read_text()
    assert json.loads((tmp_path / "reports/data_summary.json").read_text())["per_class"]["blue"]["kept"] == 1
    assert "blue,2,1,1," in (tmp_path / "reports/data/class_counts.csv").read_text()  # the data look too
    assert not (tmp_path / "data/prepared/manifest.csv").exists()
