import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kennel.data.shards import read_classes, read_split
from kennel.data.synthetic import render
from kennel.evaluate.evaluation import evaluate_model, file_name
from tests.conftest import build_dataset, random_model_file

SIZE = 32


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    resized = build_dataset(root, per_class=12, size=SIZE)
    model = random_model_file(root / "model.pt", read_classes(resized), SIZE)
    return root, evaluate_model(model, resized, root / "manifest.csv", device="cpu", amp="off")


def test_predictions_have_one_row_per_test_image_and_the_models_losses(binary):
    root, result = binary
    x, y = read_split(root / "resized", "test")
    frame = result.predictions()
    manifest = pd.read_csv(root / "manifest.csv")
    assert frame["path"].tolist() == manifest.loc[manifest["split"] == "test", "path"].tolist()
    assert len(frame) == len(y) > 0
    assert list(frame.columns) == ["path", "true", "predicted", "prob_cat", "prob_dog", "loss"]
    assert frame["true"].tolist() == [["cat", "dog"][i] for i in y]
    model = result.model
    with torch.no_grad():
        logits = model(torch.from_numpy(np.array(x)))
    expected = F.cross_entropy(logits, torch.from_numpy(y), reduction="none").numpy()
    assert frame["loss"].to_numpy() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    probs = frame[["prob_cat", "prob_dog"]].to_numpy()
    assert probs.sum(axis=1) == pytest.approx(1.0)
    assert frame["predicted"].tolist() == [["cat", "dog"][i] for i in probs.argmax(axis=1)]


def test_top_losses_are_the_k_highest_in_order(binary):
    _, result = binary
    k = 5
    top = result.top_losses(k)
    assert len(top) == k
    assert result.losses[top].tolist() == sorted(result.losses, reverse=True)[:k]
    assert result.losses[top].min() >= np.delete(result.losses, top).max()
    assert len(result.top_losses(10_000)) == len(result.losses)
    captions = result.captions(top)
    for i, caption in zip(top, captions, strict=True):
        assert f"loss {result.losses[i]:.2f}" in caption and f"true {result.classes[result.labels[i]]}" in caption
    cams = result.cams(top)
    assert cams.shape == (k, SIZE, SIZE) and cams.min() >= 0 and cams.max() <= 1


def test_a_manifest_that_does_not_match_the_arrays_is_named(binary, tmp_path):
    root, _ = binary
    manifest = pd.read_csv(root / "manifest.csv")
    manifest = manifest.drop(manifest.index[manifest["split"] == "test"][-1])  # one test image fewer
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ValueError, match="manifest.csv: the test rows do not match the test split of"):
        evaluate_model(root / "model.pt", root / "resized", tmp_path / "manifest.csv", device="cpu", amp="off")


def test_three_classes_have_curves_per_class(tmp_path):
    for label, draw in (("cat", "cat"), ("dog", "dog"), ("fox sp.", "cat")):
        (tmp_path / "raw" / label).mkdir(parents=True)
        for i in range(10):
            img = render(draw, 3 if label == "fox sp." else 1, i)
            Image.fromarray(np.asarray(img)[:, ::-1] if label == "fox sp." else np.asarray(img)).save(
                tmp_path / "raw" / label / f"{i}.png")
    resized = build_dataset(tmp_path, size=SIZE, source="folder", val=0.2, test=0.4)
    classes = read_classes(resized)
    model = random_model_file(tmp_path / "model.pt", classes, SIZE)
    result = evaluate_model(model, resized, tmp_path / "manifest.csv", device="cpu", amp="off")
    assert [c.name for c in result.curves] == ["cat", "dog", "fox sp."]
    assert set(result.metrics["one_vs_rest"]) == {"cat", "dog", "fox sp."}
    assert [f"prob_{c}" for c in classes] == list(result.predictions().columns[3:6])
    assert file_name("fox sp.") == "fox_sp"
    # many classes: recall and precision per class, worst recall first, beside the confusion matrix of shares
    from kennel.evaluate.figures import confusion_png, per_class_png

    report = result.metrics["per_class"]
    png = per_class_png(report, tmp_path / "per_class.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    worst = result.metrics["worst_classes"]
    assert [report[c]["recall"] for c in worst] == sorted(report[c]["recall"] for c in classes)
    assert confusion_png(np.array(result.metrics["confusion_matrix"]), classes, tmp_path / "cm.png").exists()
