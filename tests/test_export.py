"""``kennel export``: an ONNX file that matches the PyTorch model (checked before it is written), carries its
preprocessing contract, runs in ``kennel predict --runtime onnx`` without torch, and is served by the pyfunc."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from mlflow.pyfunc import PythonModelContext
from PIL import Image

import kennel
from kennel import track
from kennel.cli.main import main
from kennel.cli.predict import predict_files
from kennel.core.errors import ExportError
from kennel.data.shards import read_split
from kennel.export.onnx_export import OPSET, export_from_splits, float_convs
from kennel.model.file import save_model
from kennel.model.inference import load_model_file, predict_arrays
from kennel.model.network import build_model
from kennel.model.onnx_inference import load_onnx_model, predict_onnx
from kennel.track.serving import ImageClassifier
from tests.conftest import REPO, blocking, random_model_file, write_image

SIZE = 32
CLASSES = ["cat", "dog"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, resized_with) -> tuple[Path, Path, Path, dict]:
    """(model file, its fp32 ONNX export, the data it was checked on, the report): one export for the module."""
    root = tmp_path_factory.mktemp("export")
    model_file = random_model_file(root / "model.pt", CLASSES, SIZE)
    data = resized_with(8, SIZE)
    report = export_from_splits(load_model_file(model_file), root / "model.onnx", data)
    return model_file, root / "model.onnx", data, report


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of small photos of both classes, one PNG, and a file that is no image."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(6):
        write_image(folder / f"{CLASSES[i % 2]}{i}.{'png' if i == 3 else 'jpg'}", i, CLASSES[i % 2], (40 + 7 * i, 48))
    (folder / "notes.jpg").write_text("not an image\n")
    return folder


def test_the_export_matches_pytorch_and_carries_the_contract(exported):
    model_file, onnx_file, data, report = exported
    assert report["images"] == 4 and report["top1_differs"] == 0 and report["max_prob_diff"] <= 1e-4
    assert report["bytes"] == onnx_file.stat().st_size and report["opset"] == OPSET
    proto = onnx.load(str(onnx_file))
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    model = load_onnx_model(onnx_file)
    meta = model.metadata
    assert (model.classes, model.size, model.mode) == (CLASSES, SIZE, "squash")
    assert meta["arch"] == "resnet18" and meta["version"] == kennel.__version__ and meta["tta"] == "none"
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and json.loads(meta["std"]) == [0.229, 0.224, 0.225]
    assert meta["quantization"] == "none"
    # any batch size, the same numbers as PyTorch
    images = np.random.default_rng(0).integers(0, 256, (5, 3, SIZE, SIZE), dtype=np.uint8)
    torch_probs = predict_arrays(images, load_model_file(model_file))
    for batch in (1, 5):
        np.testing.assert_allclose(predict_onnx(images, model, batch), torch_probs, atol=1e-5)


def test_dihedral_tta_exports_with_its_eight_views(exported, tmp_path):
    """The turns are transposes and flips in the graph: ONNX averages the same eight views as PyTorch."""
    model_file, _, data, _ = exported
    loaded = load_model_file(model_file)
    loaded.module.tta = "dihedral"
    report = export_from_splits(loaded, tmp_path / "model.onnx", data)
    assert report["top1_differs"] == 0 and report["max_prob_diff"] <= 1e-4
    model = load_onnx_model(tmp_path / "model.onnx")
    assert model.metadata["tta"] == "dihedral"
    images = np.random.default_rng(1).integers(0, 256, (3, 3, SIZE, SIZE), dtype=np.uint8)
    turned = np.ascontiguousarray(np.rot90(images, 1, axes=(2, 3)))
    np.testing.assert_allclose(predict_onnx(images, model, 3), predict_arrays(images, loaded), atol=1e-5)
    np.testing.assert_allclose(predict_onnx(turned, model, 3), predict_onnx(images, model, 3), atol=1e-5)


def test_an_ensemble_exports_and_serves_the_mean_of_its_members(exported, tmp_path):
    """train.ensemble's model: its file, its ONNX export and its torch.export program (MLflow's pt2 model) all give
    the mean of the members' logits."""
    model_file, _, data, _ = exported
    single = load_model_file(model_file)
    model = load_model_file(model_file).module
    torch.manual_seed(1)
    other, _ = build_model("resnet18", CLASSES)
    model.add_members(1)
    model.members[0].load_state_dict(other.backbone.state_dict())
    save_model(model, tmp_path / "model.pt", size=SIZE, arch="resnet18", mode="squash")
    ensemble = load_model_file(tmp_path / "model.pt")
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 3, SIZE, SIZE), dtype=np.uint8))
    with torch.no_grad():
        torch.testing.assert_close(ensemble.module(x), (single.module(x) + other.eval()(x)) / 2)
        program = torch.export.export(ensemble.module, (x,))
        torch.testing.assert_close(program.module()(x), ensemble.module(x))
    report = export_from_splits(ensemble, tmp_path / "model.onnx", data)
    assert report["top1_differs"] == 0 and report["max_prob_diff"] <= 1e-4
    np.testing.assert_allclose(predict_onnx(x.numpy(), load_onnx_model(tmp_path / "model.onnx"), 3),
                               predict_arrays(x.numpy(), ensemble), atol=1e-5)
    assert not np.allclose(predict_arrays(x.numpy(), ensemble), predict_arrays(x.numpy(), single), atol=1e-3)


def test_a_refused_export_writes_nothing(exported, photos, tmp_path, capsys):
    """Exit 2 and one line naming the worst image; neither a new file nor a temporary one, an earlier file as it was."""
    model_file, _, _, _ = exported
    output = tmp_path / "model.onnx"
    output.write_bytes(b"an earlier export")
    argv = ["export", "--model", str(model_file), "--images", str(photos / "cat0.jpg"), str(photos / "dog1.jpg"),
            "--tolerance", "0", "--output", str(output)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kennel export: error: ONNX export refused, nothing written to")
    assert re.search(r"probabilities differ by up to \S+ \(on \S+/(cat0|dog1)\.jpg\), above the tolerance 0$", err)
    assert output.read_bytes() == b"an earlier export" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_int8_is_smaller_and_reports_its_accuracy(exported, tmp_path):
    model_file, onnx_file, data, _ = exported
    output = tmp_path / "model.int8.onnx"
    report = export_from_splits(load_model_file(model_file), output, data, quantize="int8", max_drop=1.0)
    assert report["bytes"] < onnx_file.stat().st_size / 3 and report["int8_test_images"] == 4
    assert report["int8_drop"] == pytest.approx(report["accuracy_fp32"] - report["accuracy_int8"])
    assert load_onnx_model(output).metadata["quantization"] == "int8"
    graph = onnx.load(str(output)).graph
    made_by = {out: node for node in graph.node for out in node.output}
    quantized = ["DequantizeLinear" == getattr(made_by.get(node.input[1]), "op_type", "")
                 for node in graph.node if node.op_type == "Conv"]
    assert all(quantized) and report["int8_float_convs"] == 0  # resnet18: no depthwise stem, every conv in int8

    with pytest.raises(ExportError, match="int8 needs calibration images"):
        from kennel.export.onnx_export import Images, export_onnx

        export_onnx(load_model_file(model_file), tmp_path / "x.onnx", quantize="int8",
                    check=Images(np.zeros((1, 3, SIZE, SIZE), np.uint8), ["zeros"]))
    assert not (tmp_path / "x.onnx").exists()


def test_int8_keeps_a_depthwise_stem_in_float():
    """The convolutions up to the first depthwise one stay float when it comes within the first three (MobileNets),
    none otherwise (resnets, or a grouped convolution deep in the network)."""
    def graph(groups: list[int]) -> onnx.GraphProto:
        nodes = [onnx.helper.make_node("Conv", [f"x{k}", f"w{k}"], [f"x{k + 1}"], name=f"conv{k}", group=g)
                 for k, g in enumerate(groups)]
        return onnx.helper.make_graph(nodes, "g", [], [])

    assert float_convs(graph([1, 32, 1, 1, 96])) == ["conv0", "conv1"]
    assert float_convs(graph([32, 1])) == ["conv0"]
    assert float_convs(graph([1, 1, 1, 1])) == [] and float_convs(graph([1, 1, 1, 8])) == []


NO_TORCH = """
import sys
from kennel.cli.main import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "mlflow"))
print(code, loaded)
"""


def test_predict_on_onnx_gives_the_torch_csv_without_importing_torch(exported, photos, tmp_path, capsys):
    model_file, onnx_file, _, _ = exported
    assert main(["predict", str(photos), "--model", str(model_file), "--amp", "off", "--device", "cpu",
                 "--output", str(tmp_path / "torch.csv")]) == 0
    out = subprocess.run([sys.executable, "-c", NO_TORCH, "predict", str(photos), "--runtime", "onnx", "--model",
                          str(onnx_file), "--output", str(tmp_path / "onnx.csv"), "--batch-size", "4"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "0 []", out.stdout + out.stderr
    by_torch, by_onnx = (pd.read_csv(tmp_path / f"{name}.csv", keep_default_na=False) for name in ("torch", "onnx"))
    assert list(by_onnx.columns) == list(by_torch.columns) == ["path", "class", "error", "p_cat", "p_dog"]
    pd.testing.assert_frame_equal(by_onnx[["path", "class", "error"]], by_torch[["path", "class", "error"]])
    broken = by_onnx["path"].str.endswith("notes.jpg")
    assert by_onnx.loc[broken, "error"].str.startswith("UnidentifiedImageError").all()
    probs = [f[~broken][["p_cat", "p_dog"]].to_numpy(float) for f in (by_torch, by_onnx)]
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-5)


def test_the_served_pyfunc_runs_the_onnx_file(exported, photos):
    """The pyfunc as `mlflow models serve` loads it, with the ONNX file as its artifact (the export stage logs it
    so, checked below; the logging itself is test_serve's)."""
    model_file, onnx_file, _, _ = exported
    model = ImageClassifier()
    model.load_context(PythonModelContext({"model": str(onnx_file)}, None))
    assert model.model.metadata["quantization"] == "none"
    files = sorted(photos.iterdir())
    served = model.predict(None, pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in files]}))
    local = predict_files(files, load_model_file(model_file))
    assert list(served["error"] != "") == list(local["error"] != "") and list(served["class"]) == list(local["class"])
    np.testing.assert_allclose(served[["p_cat", "p_dog"]], local[["p_cat", "p_dog"]], atol=1e-5)


def test_export_from_a_run_without_a_model_names_it(tmp_path, monkeypatch, capsys):
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    with track.open_run(tmp_path, "kennel") as run_id:
        pass
    assert main(["export", "--model", run_id]) == 2
    assert capsys.readouterr().err == (f"kennel export: error: '{run_id}': run {run_id} has no model file (no tag "
                                       "kennel.serving_uri); is it a finished kennel train run?\n")
    write_image(tmp_path / "a.png", seed=0)
    assert main(["predict", "a.png", "--runtime", "onnx", "--model", run_id]) == 2
    assert capsys.readouterr().err == (f"kennel predict: error: cannot load model: '{run_id}': run {run_id} has no "
                                       "ONNX model (no tag kennel.onnx_uri): the export stage logs one (`dvc repro "
                                       "export`), or pass an .onnx file `kennel export` wrote\n")


def test_the_export_stage_wrote_and_logged_the_onnx_model(pipeline, tmp_path):
    """The shared `dvc repro` ran the export stage: models/model.onnx, reports/export.json, and the same MLflow
    run holds both, with a servable classifier on onnxruntime."""
    root = pipeline.root
    report = json.loads((root / "reports/export.json").read_text())
    assert report["quantize"] == "none" and report["top1_differs"] == 0 and report["max_prob_diff"] <= 1e-4
    assert report["bytes"] == (root / "models/model.onnx").stat().st_size and report["torch_bytes"] > 0
    assert load_onnx_model(root / "models/model.onnx").classes == json.loads(
        (root / "data/audited/classes.json").read_text())["classes"]
    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags["kennel.onnx_uri"] == f"runs:/{run_id}/onnx/model.onnx"
    assert {a.path for a in client.list_artifacts(run_id, "onnx")} == {"onnx/model.onnx", "onnx/export.json"}
    assert run.data.metrics["export_max_prob_diff"] == pytest.approx(report["max_prob_diff"])
    champion = client.get_model_version_by_alias("kennel", "champion")
    assert champion.run_id == run_id and "runtime" not in run.data.params
    served = run.data.tags["kennel.onnx_serving_uri"]
    assert mlflow.models.get_model_info(served).metadata["kennel.runtime"] == "onnx"
    requirements = Path(mlflow.pyfunc.get_model_dependencies(served)).read_text()
    assert "onnxruntime==" in requirements and "torch" not in requirements  # torchvision neither
    # in a process where torch cannot be imported: loaded as `mlflow models serve` loads it, it classifies; and
    # `kennel predict --runtime onnx` finds it by the registry's champion (images as PNG files: the same pixels)
    images = np.asarray(read_split(root / "data/audited", "test")[0][:5])
    np.save(tmp_path / "images.npy", images)
    for i, image in enumerate(images):
        Image.fromarray(image.transpose(1, 2, 0)).save(tmp_path / f"{i}.png")
    predicted = tmp_path / "predicted.csv"
    out = subprocess.run([sys.executable, "-c", SERVED_WITHOUT_TORCH, served, str(tmp_path / "images.npy"),
                          "predict", *(str(tmp_path / f"{i}.png") for i in range(len(images))), "--runtime", "onnx",
                          "--model", "models:/kennel@champion", "--output", str(predicted)],
                         capture_output=True, text=True, timeout=300, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stdout + out.stderr
    rows = pd.read_json(io.StringIO(out.stdout.splitlines()[0]), orient="split")
    onnx_model = load_onnx_model(root / "models/model.onnx")
    expected = predict_onnx(images, onnx_model)
    columns = [f"p_{c}" for c in onnx_model.classes]
    np.testing.assert_allclose(rows[columns].to_numpy(float), expected, atol=1e-6)
    assert list(rows["error"]) == [""] * len(images)
    assert f"(model models:/kennel@champion (run {run_id}))" in out.stdout
    np.testing.assert_allclose(pd.read_csv(predicted)[columns].to_numpy(float), expected, atol=1e-6)


SERVED_WITHOUT_TORCH = blocking("torch", "torchvision") + """
import mlflow, numpy as np
from kennel.cli.main import main
from kennel.core.paths import project_root, tracking_uri

mlflow.set_tracking_uri(tracking_uri(project_root()))
rows = mlflow.pyfunc.load_model(sys.argv[1]).predict(np.load(sys.argv[2]))
print(rows.to_json(orient="split", index=False))
sys.exit(main(sys.argv[3:]))
"""
