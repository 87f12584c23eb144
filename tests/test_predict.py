"""``kennel predict``: files and folders in, one row per file out, with the tensors training saw."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from kennel import track
from kennel.cli.main import main
from kennel.cli.predict import expand, predict_files, resolve_model
from kennel.core.device import CPU_INFERENCE_BATCH, inference_batch
from kennel.core.params import params_from_dict
from kennel.data.images import load_array
from kennel.data.manifest import SPLITS, account
from kennel.data.shards import read_split
from kennel.data.sources import find_images
from kennel.data.validate import inspect_all
from kennel.model.file import save_model
from kennel.model.inference import LoadedModel, load_model_file, predict_arrays, preprocess, softmax
from kennel.model.network import Classifier
from kennel.train.fine_tune import train
from tests.conftest import REPO, build_dataset, isolate, small_params

SIZE = 32
MODE = "squash"  # what build_dataset resizes with (load_array's default)


def kennel_predict(argv: list[str]) -> int:
    """``python -m kennel predict ARGV`` in this process: its exit status, its errors on stderr."""
    return main(["predict", *argv])


@dataclass
class Trained:
    root: Path  # a project folder: models/model.pt, data under prepared/ and resized/
    resized: Path
    model: Classifier
    loaded: LoadedModel


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """One epoch on 16 tiny synthetic images: seconds, and a real kennel model file."""
    mp = pytest.MonkeyPatch()
    isolate(mp, tmp_path_factory.mktemp("torch_home"))
    root = tmp_path_factory.mktemp("project")
    (root / ".dvc").mkdir()  # project_root() stops here
    resized = build_dataset(root, per_class=8, size=SIZE)
    result = train(params_from_dict(small_params(**{"train.epochs": 1})), resized)
    save_model(result.model, root / "models" / "model.pt", size=SIZE, arch="resnet18", mode=MODE)
    yield Trained(root, resized, result.model.eval(), load_model_file(root / "models" / "model.pt"))
    mp.undo()


@pytest.fixture
def batch(trained, tmp_path) -> Path:
    """A folder as users have them: good images (nested, any format and shape) and broken files."""
    folder = tmp_path / "batch"
    (folder / "nested" / "deeper").mkdir(parents=True)
    images = sorted((trained.root / "prepared" / "images").rglob("*.jpg"))
    shutil.copy(images[0], folder / "a.jpg")
    shutil.copy(images[-1], folder / "nested" / "b.jpg")
    Image.open(images[1]).convert("RGBA").resize((90, 60)).save(folder / "nested" / "deeper" / "c.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image, whatever the name says\n")
    return folder


def _probabilities(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return frame[[f"p_{c}" for c in classes]].to_numpy()


def test_predict_files_gives_one_row_per_file(trained, batch):
    frame = predict_files([batch], trained.loaded, batch_size=2)  # broken files sit between good ones in a batch
    classes = trained.loaded.classes
    assert list(frame.columns) == ["path", "class", "error"] + [f"p_{c}" for c in classes]
    expected = sorted(str(p) for p in batch.rglob("*") if p.is_file())
    assert list(frame["path"]) == expected and len(frame) == 5

    broken = frame[frame["path"].str.endswith(("empty.jpg", "notes.jpg"))]
    assert len(broken) == 2
    assert (broken["class"] == "").all() and broken["error"].str.contains("UnidentifiedImageError").all()
    assert np.isnan(_probabilities(broken, classes)).all()

    good = frame[frame["error"] == ""]
    assert len(good) == 3
    probs = _probabilities(good, classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
    assert list(good["class"]) == [classes[i] for i in probs.argmax(axis=1)]


def test_predict_files_takes_files_and_missing_paths(trained, batch):
    frame = predict_files([batch / "a.jpg", batch / "gone.jpg"], trained.loaded)
    assert list(frame["path"]) == [str(batch / "a.jpg"), str(batch / "gone.jpg")]
    assert frame["error"].iloc[0] == "" and frame["error"].iloc[1].startswith("FileNotFoundError")


def _manifest(root: Path) -> pd.DataFrame:
    """build_dataset's manifest again, from its images on disk (the folder layout gives the same labels)."""
    candidates = find_images("folder", root / "prepared" / "images")
    return account(candidates, inspect_all(candidates, 8, 10**8), root, 0.25, 0.25, 0).manifest


def test_predict_feeds_the_model_the_training_tensors(trained):
    manifest = _manifest(trained.root)
    columns = ["path", "label", "split", "sha1"]
    written = pd.read_csv(trained.root / "manifest.csv", dtype=str, keep_default_na=False)
    assert manifest[columns].to_csv(index=False) == written[columns].to_csv(index=False)  # same rows, same order

    assert trained.loaded.mode == MODE and trained.loaded.size == SIZE
    for split in SPLITS:
        paths = [trained.root / p for p in manifest.loc[manifest["split"] == split, "path"]]
        resized = np.array(read_split(trained.resized, split)[0])
        assert len(paths) == len(resized) > 0
        for path, row in zip(paths, resized, strict=True):
            np.testing.assert_array_equal(preprocess(path, trained.loaded), row)
        # and the probabilities are the model's on exactly those rows
        with torch.inference_mode():
            expected = softmax(trained.model(torch.from_numpy(resized)).numpy().astype(np.float64))
        frame = predict_files(paths, trained.loaded)
        np.testing.assert_allclose(_probabilities(frame, trained.loaded.classes), expected, rtol=1e-5, atol=1e-6)


def test_the_batch_an_inference_pass_runs_at_changes_no_probability(trained):
    # the CPU runs inference passes a few images at a time because it is faster there: the numbers must not move
    # (beyond the last float digit: a batch of 1 or 3 may take other kernels than one of 4, 8 or 16)
    images = np.concatenate([read_split(trained.resized, split)[0] for split in SPLITS])
    assert inference_batch(torch.device("cpu")) == CPU_INFERENCE_BATCH < len(images)
    assert inference_batch(torch.device("cuda"), 256) == 256
    default = predict_arrays(images, trained.loaded)
    assert np.array_equal(predict_arrays(images, trained.loaded, len(images)), default)
    for batch_size in (1, 3):
        np.testing.assert_allclose(predict_arrays(images, trained.loaded, batch_size), default, rtol=0, atol=1e-6)
    np.testing.assert_allclose(predict_arrays(images, trained.loaded, 3, amp_dtype=torch.bfloat16),
                               predict_arrays(images, trained.loaded, len(images), amp_dtype=torch.bfloat16),
                               rtol=0, atol=1e-6)


def test_preprocess_uses_the_model_resize_mode(trained, batch):
    wide = batch / "nested" / "deeper" / "c.png"  # 90 x 60: the modes differ
    for mode in ("pad", "center_crop"):
        model = replace(trained.loaded, mode=mode)
        np.testing.assert_array_equal(preprocess(wide, model), load_array(wide, SIZE, mode=mode))
    assert not np.array_equal(preprocess(wide, replace(trained.loaded, mode="pad")),
                              preprocess(wide, replace(trained.loaded, mode="squash")))


def test_model_file_without_mode_means_center_crop(trained, tmp_path):
    payload = torch.load(trained.root / "models" / "model.pt", weights_only=True)
    del payload["mode"]  # a file written before the mode was stored
    torch.save(payload, tmp_path / "old.pt")
    assert load_model_file(tmp_path / "old.pt").mode == "center_crop"


def test_cli_prints_a_table_for_the_default_model(trained, batch, monkeypatch, capsys):
    monkeypatch.chdir(trained.root)
    assert kennel_predict([str(batch)]) == 0
    out = capsys.readouterr().out
    assert "a.jpg" in out and "notes.jpg" in out and "UnidentifiedImageError" in out
    assert "5 file(s), 3 predicted, 2 failed" in out and str(trained.root / "models" / "model.pt") in out


def test_cli_writes_csv(trained, batch, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained.root)
    out_csv = tmp_path / "out" / "predictions.csv"
    assert kennel_predict([str(batch), "--output", str(out_csv), "--batch-size", "3", "--amp", "off"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and str(out_csv) in printed[0]
    written = pd.read_csv(out_csv, keep_default_na=False, na_values=[""])
    expected = predict_files([batch], trained.loaded)
    assert list(written["path"]) == list(expected["path"])
    np.testing.assert_allclose(_probabilities(written, trained.loaded.classes),
                               _probabilities(expected, trained.loaded.classes), atol=1e-6, equal_nan=True)


def test_worker_processes_keep_order_and_error_rows(trained, batch, tmp_path):
    many = expand([batch]) * 7  # bad files among good, repeated
    one = predict_files(many, trained.loaded, batch_size=4, workers=0)
    two = predict_files(many, trained.loaded, batch_size=4, workers=2)
    assert list(two["path"]) == [str(p) for p in many] and list(two["error"]) == list(one["error"])
    assert (two["error"] != "").sum() == 2 * 7
    np.testing.assert_allclose(_probabilities(two, trained.loaded.classes),
                               _probabilities(one, trained.loaded.classes), atol=1e-6, equal_nan=True)


def test_resume_after_a_kill_ends_with_the_uninterrupted_csv(trained, batch, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained.root)
    files = tmp_path / "files"
    for i in range(6):  # 30 files: 18 good, 12 broken
        shutil.copytree(batch, files / str(i))
    whole, resumed = tmp_path / "whole.csv", tmp_path / "resumed.csv"
    argv = [str(files), "--batch-size", "4", "--amp", "off", "--workers", "0"]
    assert kennel_predict([*argv, "--output", str(whole)]) == 0
    lines = whole.read_text().splitlines(keepends=True)
    resumed.write_text("".join(lines[:13]) + lines[13][:20])  # killed mid-row, 12 rows in
    assert kennel_predict([*argv, "--output", str(resumed), "--resume"]) == 0
    assert "12 kept from the earlier run" in capsys.readouterr().out
    assert resumed.read_text() == whole.read_text()
    assert kennel_predict([*argv, "--output", str(resumed), "--resume"]) == 0  # nothing left: nothing added
    assert resumed.read_text() == whole.read_text()


def test_resume_after_killing_the_process(trained, batch, tmp_path, monkeypatch):
    """A real kill -9 mid-run: the rows written so far stay, --resume adds the rest, the file equals a whole run's.
    The killed run is a process of its own; the whole run and the resume run here (the same code, no start-up)."""
    files = tmp_path / "many"
    for i in range(200):  # 1,000 files: a few seconds of predicting to kill in
        shutil.copytree(batch, files / f"{i:03d}")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    argv = [str(files), "--batch-size", "4", "--amp", "off", "--workers", "0"]
    whole, killed = tmp_path / "whole.csv", tmp_path / "killed.csv"
    monkeypatch.chdir(trained.root)
    assert kennel_predict([*argv, "--output", str(whole)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "kennel", "predict", *argv, "--output", str(killed)],
                            cwd=trained.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not killed.exists() or killed.read_text().count("\n") < 20):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    written = killed.read_text().count("\n")
    assert 20 <= written < 1001, written  # killed part way
    assert kennel_predict([*argv, "--output", str(killed), "--resume"]) == 0
    assert killed.read_text() == whole.read_text()


def test_device_and_mixed_precision_flags(trained, batch, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained.root)
    exact, bf16 = tmp_path / "exact.csv", tmp_path / "bf16.csv"
    assert kennel_predict([str(batch), "--device", "cpu", "--amp", "off", "--output", str(exact)]) == 0
    assert kennel_predict([str(batch), "--device", "cpu", "--amp", "bf16", "--output", str(bf16)]) == 0
    a, b = (pd.read_csv(p, keep_default_na=False, na_values=[""]) for p in (exact, bf16))
    np.testing.assert_allclose(_probabilities(a, trained.loaded.classes), _probabilities(b, trained.loaded.classes),
                               atol=0.05, equal_nan=True)  # bf16 rounds, it does not change the answer
    if not torch.cuda.is_available():
        assert kennel_predict([str(batch), "--device", "cuda"]) == 2
        assert "no cuda device is available" in capsys.readouterr().err


def test_the_progress_bar_shows_on_a_terminal_only(trained, batch, tmp_path, monkeypatch, capsys):
    import fcntl
    import pty
    import struct
    import termios

    monkeypatch.chdir(trained.root)  # not a terminal: pytest's captured stderr
    assert kennel_predict([str(batch), "--workers", "0"]) == 0
    piped = capsys.readouterr().err
    assert "predict:" not in piped and "img/s" not in piped
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "kennel", "predict", str(batch), "--workers", "0"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a width
    proc = subprocess.Popen(cmd, cwd=trained.root, env=env, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=120) == 0
    assert b"predict:   0%" in seen and b"/5 [" in seen  # the bar, counting the 5 files


@pytest.mark.parametrize("ref, says", [
    ("missing/model.pt", "'missing/model.pt': no such model file"),
    ("0123456789abcdef0123456789abcdef", "no MLflow store"),
    ("models:/no-such-model@champion", "no MLflow store"),
])
def test_cli_refuses_a_bad_model_reference(trained, batch, tmp_path, monkeypatch, capsys, ref, says):
    monkeypatch.chdir(tmp_path)  # no mlflow.db here
    (tmp_path / ".dvc").mkdir()
    assert kennel_predict([str(batch), "--model", ref]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kennel predict: error: cannot load model:") and says in err, err
    assert not (tmp_path / "mlflow.db").exists()  # looking a reference up creates no store


def test_cli_refuses_a_model_file_that_is_not_one(batch, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    assert kennel_predict([str(batch), "--model", str(tmp_path / "junk.pt")]) == 2
    assert f"'{tmp_path / 'junk.pt'}': not a kennel model file" in capsys.readouterr().err


def test_cli_refuses_when_no_path_exists(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained.root)
    assert kennel_predict([str(tmp_path / "nothing"), str(tmp_path / "none.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kennel predict: error: no such file or folder:") and "none.jpg" in err


@pytest.fixture(scope="module")
def registered(trained) -> tuple[str, str]:
    """The model logged the way the train stage logs it, registered as version 1 with the alias champion."""
    root = trained.root
    with track.open_run(root, "predict-test") as run_id:
        track.log_params({"resize.size": SIZE, "resize.mode": MODE})
        x = np.array(read_split(trained.resized, "train")[0][:2])
        uri = track.log_model(trained.model, example=x)
        track.set_tags({"kennel.model_uri": uri, "kennel.classes": ",".join(trained.model.classes)})
    version = mlflow.register_model(uri, "kennel-predict-test").version
    mlflow.MlflowClient().set_registered_model_alias("kennel-predict-test", "champion", version)
    return run_id, version


def test_cli_loads_mlflow_references(trained, registered, batch, tmp_path, monkeypatch, capsys):
    run_id, version = registered
    monkeypatch.chdir(trained.root)
    expected = predict_files([batch], trained.loaded)
    for ref in (run_id, "models:/kennel-predict-test@champion", f"models:/kennel-predict-test/{version}"):
        out_csv = tmp_path / "predictions.csv"
        argv = [str(batch), "--model", ref, "--output", str(out_csv), "--amp", "off"]
        assert kennel_predict(argv) == 0, capsys.readouterr().err
        assert ref in capsys.readouterr().out
        written = pd.read_csv(out_csv, keep_default_na=False, na_values=[""])
        assert list(written["class"].fillna("")) == list(expected["class"])
        np.testing.assert_allclose(_probabilities(written, trained.loaded.classes),
                                   _probabilities(expected, trained.loaded.classes), atol=1e-5, equal_nan=True)


def test_resolve_model_names_what_is_missing(trained, registered):
    model = resolve_model(registered[0], trained.root)
    assert model.classes == trained.loaded.classes and (model.size, model.mode) == (SIZE, MODE)
    logged = mlflow.MlflowClient().get_run(registered[0]).data.tags["kennel.model_uri"]  # models:/m-...
    assert resolve_model(logged, trained.root).classes == trained.loaded.classes
    with pytest.raises(ValueError, match="'models:/kennel-predict-test@nope': not found in the MLflow store"):
        resolve_model("models:/kennel-predict-test@nope", trained.root)
    with pytest.raises(ValueError, match="no such MLflow run 0123456789abcdef0123456789abcdef"):
        resolve_model("0123456789abcdef0123456789abcdef", trained.root)


def test_cli_refuses_an_unreachable_tracking_server(batch, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens, on loopback
    assert kennel_predict([str(batch), "--model", "models:/kennel-predict-test@champion"]) == 2
    err = capsys.readouterr().err
    assert "'models:/kennel-predict-test@champion'" in err and "http://127.0.0.1:9" in err and "unreachable" in err


def test_cli_refuses_a_bad_batch_size(batch, capsys):
    assert kennel_predict([str(batch), "--batch-size", "0"]) == 2
    assert "expected a whole number >= 1, got '0'" in capsys.readouterr().err
