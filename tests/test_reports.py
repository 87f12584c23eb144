"""The evaluate stage's reports, written by kennel.evaluate.reports from a real evaluation of a tiny dataset."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kennel.core.paths import (
    CALIBRATION,
    CONFUSION,
    EVALUATION,
    FIGURES,
    METRICS,
    PR_DIR,
    PREDICTIONS,
    REPORTS,
    ROC_DIR,
    TOP_LOSSES,
)
from kennel.data.report import DATA_FIGURES
from kennel.data.shards import read_classes
from kennel.evaluate import reports
from kennel.evaluate.evaluation import evaluate_model
from kennel.evaluate.metrics import classification_metrics
from tests.conftest import REPO, build_dataset, random_model_file

PNG = b"\x89PNG\r\n\x1a\n"
BINARY_FIGURES = ["top_losses.png", "top_losses_gradcam.png", "confusion_matrix.png", "reliability.png", "roc.png",
                  "pr.png"]


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    resized = build_dataset(root, per_class=12, size=32)
    model = random_model_file(root / "model.pt", read_classes(resized), 32)
    return evaluate_model(model, resized, root / "manifest.csv", device="cpu", amp="off", calibration_bins=5)


@pytest.fixture
def written(binary, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return reports.write_reports(binary, top_losses=8, calibration_bins=5)


def test_every_report_is_written_where_the_stage_declares_it_and_nothing_else(written, tmp_path):
    assert written.metrics == METRICS
    assert written.tables == [EVALUATION, CONFUSION, PREDICTIONS, TOP_LOSSES, CALIBRATION]
    assert written.curves == [ROC_DIR / "dog.csv", PR_DIR / "dog.csv"]  # binary: the positive class only
    assert written.figures == [FIGURES / name for name in BINARY_FIGURES]
    on_disk = sorted(p.relative_to(tmp_path) for p in (tmp_path / REPORTS).rglob("*") if p.is_file())
    assert on_disk == sorted(written.files)
    assert len(written.files) == 1 + 5 + 2 + 6


def test_the_tables_hold_the_evaluation(binary, written):
    assert json.loads(EVALUATION.read_text()) == {"test": json.loads(json.dumps(binary.metrics))}
    headline = json.loads(METRICS.read_text())
    n = len(binary.labels)
    assert headline["test_accuracy"] == binary.metrics["accuracy"] and headline["test_images"] == n
    assert headline["test_accuracy_low"] <= binary.metrics["accuracy"] <= headline["test_accuracy_high"]
    assert not any(isinstance(v, dict | list) for v in headline.values())  # one `dvc exp show` column each
    top = pd.read_csv(TOP_LOSSES)
    assert len(top) == min(8, n) and list(top["loss"]) == sorted(binary.losses, reverse=True)[:len(top)]
    n = len(binary.labels)
    confusion = pd.read_csv(CONFUSION)
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == n
    assert pd.crosstab(confusion["actual"], confusion["predicted"]).reindex(
        index=binary.classes, columns=binary.classes, fill_value=0).to_numpy().tolist() == \
        binary.metrics["confusion_matrix"]
    predictions = pd.read_csv(PREDICTIONS)
    assert list(predictions.columns) == ["path", "true", "predicted", "prob_cat", "prob_dog", "loss"]
    assert predictions["path"].tolist() == binary.paths
    assert predictions["loss"].to_numpy() == pytest.approx(binary.losses)
    calibration = pd.read_csv(CALIBRATION)
    assert list(calibration.columns) == ["bin_low", "bin_high", "confidence", "accuracy", "count"]
    assert 0 < len(calibration) <= 5 and calibration["count"].sum() == n
    for folder, columns in ((ROC_DIR, ["fpr", "tpr", "threshold"]), (PR_DIR, ["recall", "precision", "threshold"])):
        table = pd.read_csv(folder / "dog.csv")
        assert list(table.columns) == columns and len(table) >= 2


def test_the_figures_are_pngs_and_the_top_losses_grid_has_a_panel_per_image(binary, written, tmp_path, monkeypatch):
    for path in written.figures:
        assert path.read_bytes()[:8] == PNG, path
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
    # 8 images in rows of four: two rows; 3 images: one row, three panels wide (the grid is sized by its panels).
    sizes = {}
    for k in (8, 3):
        (tmp_path / f"k{k}").mkdir()
        monkeypatch.chdir(tmp_path / f"k{k}")
        out = reports.write_reports(binary, top_losses=k, calibration_bins=5)
        with Image.open(out.figures[0]) as img:
            sizes[k] = img.size
    assert sizes[8][0] > sizes[3][0] and sizes[8][1] > sizes[3][1]


def test_stale_curve_tables_are_removed(binary, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in (ROC_DIR, PR_DIR):
        folder.mkdir(parents=True)
        (folder / "gone.csv").write_text("fpr,tpr,threshold\n")
    out = reports.write_reports(binary, top_losses=2, calibration_bins=5)
    assert sorted(p.name for p in ROC_DIR.iterdir()) == sorted(p.name for p in PR_DIR.iterdir()) == ["dog.csv"]
    assert all(p.exists() for p in out.files)


def test_binary_scalars_are_the_headline_numbers_and_each_class(binary):
    m = binary.metrics
    scalars = reports.scalar_metrics(m)
    assert list(scalars) == [
        "test_accuracy", "test_accuracy_low", "test_accuracy_high", "test_macro_f1", "test_balanced_accuracy",
        "test_worst_class_recall", "test_roc_auc", "test_average_precision", "test_ece", "test_images",
        "test_precision_cat", "test_recall_cat", "test_f1_cat", "test_precision_dog", "test_recall_dog", "test_f1_dog",
    ]
    assert scalars["test_accuracy"] == m["accuracy"] and scalars["test_macro_f1"] == m["macro_f1"]
    assert scalars["test_ece"] == m["ece"]
    recalls = [m["per_class"][name]["recall"] for name in ("cat", "dog")]
    assert scalars["test_balanced_accuracy"] == pytest.approx(sum(recalls) / 2)
    assert scalars["test_worst_class_recall"] == min(recalls)
    assert scalars["test_roc_auc"] == m["roc_auc"] and scalars["test_average_precision"] == m["average_precision"]
    for name in ("cat", "dog"):
        for k in ("precision", "recall", "f1"):
            assert scalars[f"test_{k}_{name}"] == m["per_class"][name][k]
    assert all(isinstance(v, float) for k, v in scalars.items() if k != "test_images")
    assert scalars["test_images"] == len(binary.labels)


def test_more_classes_log_each_one_vs_rest_score():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 6)
    probs = rng.dirichlet(np.ones(3), size=len(labels))
    m = classification_metrics(labels, probs, ["cat", "dog", "fox sp."])
    scalars = reports.scalar_metrics(m)
    assert "test_roc_auc" not in scalars and "test_average_precision" not in scalars
    for name in ("cat", "dog", "fox sp."):
        assert scalars[f"test_roc_auc_{name}"] == m["one_vs_rest"][name]["roc_auc"]
        assert scalars[f"test_average_precision_{name}"] == m["one_vs_rest"][name]["average_precision"]
        assert scalars[f"test_f1_{name}"] == m["per_class"][name]["f1"]
    assert len(scalars) == 8 + 3 * 3 + 3 * 2


def test_figure_links_title_each_figure_then_the_data_figures(written):
    links = reports.figure_links(written.figures)
    assert links[:6] == [
        ("top losses", "evaluation/top_losses.png"), ("top losses, Grad-CAM", "evaluation/top_losses_gradcam.png"),
        ("confusion matrix", "evaluation/confusion_matrix.png"), ("reliability", "evaluation/reliability.png"),
        ("ROC", "evaluation/roc.png"), ("precision-recall", "evaluation/pr.png"),
    ]
    assert links[6:] == [(title, f"data/{name}") for name, title in DATA_FIGURES.items()] and len(links) > 6


def test_the_summary_line():
    m = {"accuracy": 0.9375, "macro_f1": 0.93, "balanced_accuracy": 0.9375, "worst_class_recall": 0.875,
         "roc_auc": 0.981, "ece": 0.0412,
         "per_class": {"cat": {"support": 8, "recall": 0.875}, "dog": {"support": 8, "recall": 1.0}},
         "worst_classes": ["cat", "dog"]}  # 15 of 16 right
    interval = "(95 % interval 0.717-0.989, 16 images)"
    head = f"test accuracy 0.9375 {interval}  macro F1 0.9300  balanced accuracy 0.9375"
    assert reports.summary_line(m) == f"{head}  ROC AUC 0.9810  ECE 0.0412"
    del m["roc_auc"]
    assert reports.summary_line(m) == f"{head}  ECE 0.0412"
    m["per_class"]["fox"] = {"support": 0, "recall": 0.0}  # more than two classes: the worst are named
    assert reports.summary_line(m) == f"{head}  ECE 0.0412  worst recall: cat 0.88, dog 1.00"


def test_balanced_accuracy_weighs_every_class_alike_and_names_the_worst():
    from kennel.evaluate.metrics import classification_metrics

    y = np.array([0] * 90 + [1] * 5 + [2] * 5)
    probs = np.eye(3)[np.where(np.arange(100) < 95, 0, 2)]  # every image called "a" but the last five, all "c"
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.95)  # what accuracy hides: b is never found
    assert m["balanced_accuracy"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["worst_class_recall"] == 0.0 and m["worst_classes"] == ["b", "a", "c"]


def test_the_evaluate_library_does_not_load_mlflow_or_the_tracking_package():
    code = ("import sys, kennel.evaluate.reports, kennel.evaluate.note; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow' or m.startswith('kennel.track')))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
