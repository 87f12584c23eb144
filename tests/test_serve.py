"""A real `mlflow models serve` of the registered pyfunc model answers requests carrying images and pixels."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kennel import track
from kennel.cli.predict import predict_files
from kennel.model.file import save_model
from kennel.model.inference import load_model_file
from kennel.model.network import build_model
from kennel.track.serving import log_serving_model
from tests.conftest import free_port, stop_process_group, wait_for_http

SIZE = 32
NAME = "kennel-serve-test"
START_TIMEOUT_S = 120


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(64, 48), (40, 90)]):
        path = tmp_path / f"img{i}.{'png' if i else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _log(root: Path) -> str:
    """An untrained model (the answers only have to match kennel predict's) logged and registered as v1."""
    model, _ = build_model("resnet18", ["cat", "dog"], weights="none")
    # pad: the wide and tall test images show it
    save_model(model, root / "model.pt", size=SIZE, arch="resnet18", mode="pad")
    with track.open_run(root, "serve-test"):
        uri = log_serving_model(root / "model.pt", registered_model_name=NAME)
    assert uri.startswith("models:/")
    return uri


def test_pyfunc_model_in_process(tmp_path, images):
    uri = _log(tmp_path)
    (tmp_path / "loaded").mkdir()  # not a temp folder of MLflow's, which would stay behind
    model = mlflow.pyfunc.load_model(uri, dst_path=str(tmp_path / "loaded"))
    assert model.metadata.metadata == {"kennel.classes": ["cat", "dog"], "kennel.size": SIZE, "kennel.mode": "pad",
                                       "kennel.tta": "none", "kennel.runtime": "torch"}
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text()
    assert "torch==" in requirements and "+cu" not in requirements

    local = predict_files(images, load_model_file(tmp_path / "model.pt"))
    raw = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))  # bytes pass as they are
    encoded = model.predict({"image": [base64.b64encode(p.read_bytes()).decode() for p in images]})
    for answer in (raw, encoded):
        np.testing.assert_allclose(answer[["p_cat", "p_dog"]], local[["p_cat", "p_dog"]], atol=1e-6)
    bad = model.predict(pd.DataFrame({"image": ["%%% not base64", 3]}))
    assert bad["error"].str.contains("not base64").iloc[0] and "expected base64 text" in bad["error"].iloc[1]
    assert bad[["p_cat", "p_dog"]].isna().all().all()

    pixels = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.float64)
    assert len(model.predict(pixels)) == 2
    with pytest.raises(mlflow.exceptions.MlflowException, match="pixel values must lie in 0..255"):
        model.predict(pixels + 300)


@pytest.mark.slow
def test_served_model_classifies_images_and_pixels(tmp_path, images):
    _log(tmp_path)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", "1")

    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": track.tracking_uri(tmp_path)}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/ping", server, log, timeout=START_TIMEOUT_S)

        # image files, base64: the answer matches `kennel predict` on the same files; a broken one gets an error
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        broken = base64.b64encode(b"<html>not an image</html>").decode()
        body = {"dataframe_split": {"columns": ["image"], "data": [[encoded[0]], [broken], [encoded[1]]]}}
        status, reply = _post(f"{base}/invocations", body)
        assert status == 200, reply
        served = pd.DataFrame(reply["predictions"])
        assert list(served.columns) == ["class", "error", "p_cat", "p_dog"]
        assert served["error"].iloc[1].startswith("UnidentifiedImageError") and served["class"].iloc[1] == ""
        good = served.drop(index=1)
        assert (good["error"] == "").all()
        probs = good[["p_cat", "p_dog"]].to_numpy(dtype=float)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
        local = predict_files(images, load_model_file(tmp_path / "model.pt"))
        np.testing.assert_allclose(probs, local[["p_cat", "p_dog"]].to_numpy(), atol=1e-6)
        assert list(good["class"]) == list(local["class"])

        # pixels, as JSON gives them (int64), in both layouts
        pixels = np.random.default_rng(1).integers(0, 256, (2, 3, SIZE, SIZE))
        answers = []
        for x in (pixels, pixels.transpose(0, 2, 3, 1)):
            status, reply = _post(f"{base}/invocations", {"inputs": x.tolist()})
            assert status == 200, reply
            answers.append(pd.DataFrame(reply["predictions"]))
        assert len(answers[0]) == 2 and (answers[0]["error"] == "").all()
        np.testing.assert_allclose(answers[0][["p_cat", "p_dog"]].sum(axis=1), 1.0, rtol=1e-6)
        pd.testing.assert_frame_equal(answers[0], answers[1])

        # 8 requests at once, 32 images each (every fourth one broken): every answer right, none mixed up
        many = [encoded[i % 2] if i % 4 else broken for i in range(32)]
        expected = predict_files([images[i % 2] for i in range(32) if i % 4], load_model_file(tmp_path / "model.pt"))
        body = {"dataframe_split": {"columns": ["image"], "data": [[v] for v in many]}}
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: _post(f"{base}/invocations", body), range(8)))
        for status, reply in replies:
            assert status == 200, reply
            frame = pd.DataFrame(reply["predictions"])
            assert len(frame) == 32 and list(frame["error"] != "") == [i % 4 == 0 for i in range(32)]
            np.testing.assert_allclose(frame.loc[frame["error"] == "", ["p_cat", "p_dog"]].to_numpy(dtype=float),
                                       expected[["p_cat", "p_dog"]].to_numpy(), atol=1e-6)

        # a wrong shape is the client's error, and says what is expected
        status, reply = _post(f"{base}/invocations", {"inputs": np.zeros((1, 3, 16, 16), int).tolist()})
        assert status == 400 and f"expected pixels N x 3 x {SIZE} x {SIZE}" in reply["message"], reply
    finally:
        stop_process_group(server.pid)
