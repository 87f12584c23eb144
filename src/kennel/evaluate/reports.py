"""The evaluation's reports: metrics.json (the headline) and evaluation.json (every number), the tables, the
ROC/PR curve tables and the figures the evaluate stage declares, the metric names it logs, and the titles its run
note links the figures by. No MLflow here: the stage logs what these write."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kennel.core.paths import (
    CALIBRATION,
    CONFUSION,
    EVALUATION,
    FIGURES,
    METRICS,
    PR_DIR,
    PREDICTIONS,
    ROC_DIR,
    TOP_LOSSES,
)
from kennel.core.plots import image_grid
from kennel.data.report import DATA_FIGURES
from kennel.evaluate.evaluation import Evaluation, file_name
from kennel.evaluate.figures import confusion_png, per_class_png, pr_png, reliability_png, roc_png
from kennel.evaluate.metrics import accuracy_interval

FIGURE_TITLES = {
    "top_losses.png": "top losses", "top_losses_gradcam.png": "top losses, Grad-CAM",
    "confusion_matrix.png": "confusion matrix", "roc.png": "ROC", "pr.png": "precision-recall",
    "reliability.png": "reliability", "per_class.png": "per class, worst recall first",
}


@dataclass(frozen=True)
class Reports:
    """The files ``write_reports`` wrote, by kind: ``metrics`` (metrics.json: the headline DVC compares),
    ``tables`` (evaluation.json with every number, confusion, predictions, calibration), ``curves`` (one ROC and one
    PR table per curve) and ``figures`` (PNGs)."""

    metrics: Path
    tables: list[Path]
    curves: list[Path]
    figures: list[Path]

    @property
    def files(self) -> list[Path]:
        return [self.metrics, *self.tables, *self.curves, *self.figures]


def write_reports(result: Evaluation, *, top_losses: int, calibration_bins: int) -> Reports:
    """Write every report of ``result`` at its place under reports/ (kennel.core.paths), relative to the cwd."""
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    METRICS.write_text(json.dumps(headline_metrics(result.metrics), indent=2) + "\n")
    EVALUATION.write_text(json.dumps({"test": result.metrics}, indent=2) + "\n")
    result.confusion_rows().to_csv(CONFUSION, index=False)
    predictions = result.predictions()
    predictions.to_csv(PREDICTIONS, index=False)
    predictions.iloc[result.top_losses(top_losses)][["path", "true", "predicted", "loss"]].to_csv(TOP_LOSSES,
                                                                                                   index=False)
    result.reliability.to_csv(CALIBRATION, index=False)
    curves = write_curves(result)
    figures = write_figures(result, top_losses=top_losses, calibration_bins=calibration_bins)
    return Reports(METRICS, [EVALUATION, CONFUSION, PREDICTIONS, TOP_LOSSES, CALIBRATION], curves, figures)


def headline_metrics(metrics: Mapping) -> dict[str, float]:
    """The numbers a person compares runs by, under the names the MLflow run has too: test_accuracy with its 95 %
    interval (test_accuracy_low/high), test_macro_f1, test_balanced_accuracy, test_worst_class_recall (imbalanced
    or many classes: what accuracy hides), test_roc_auc and test_average_precision where defined,
    test_ece and test_images (how many the accuracy is over)."""
    m = metrics
    n, low, high = accuracy_interval(m)
    scalars = {"test_accuracy": m["accuracy"], "test_accuracy_low": low, "test_accuracy_high": high,
               "test_macro_f1": m["macro_f1"], "test_balanced_accuracy": m["balanced_accuracy"],
               "test_worst_class_recall": m["worst_class_recall"]}
    for key in ("roc_auc", "average_precision"):
        if key in m:
            scalars[f"test_{key}"] = m[key]
    return {**scalars, "test_ece": m["ece"], "test_images": n}


def scalar_metrics(metrics: Mapping) -> dict[str, float]:
    """Everything the MLflow run records of ``metrics`` (as in evaluation.json): the headline, then
    test_{precision,recall,f1}_<class> and each one-vs-rest score as test_<score>_<class>."""
    m = metrics
    scalars = headline_metrics(m)
    for name, r in m["per_class"].items():
        scalars.update({f"test_{k}_{name}": r[k] for k in ("precision", "recall", "f1")})
    for name, r in m.get("one_vs_rest", {}).items():
        scalars.update({f"test_{k}_{name}": v for k, v in r.items()})
    return scalars


def figure_links(figures: Sequence[Path]) -> list[tuple[str, str]]:
    """(title, artifact path) of each evaluation figure as logged under evaluation/, then of prepare's data
    figures under data/: the run note's links."""
    links = [(FIGURE_TITLES[p.name], f"evaluation/{p.name}") for p in figures]
    return links + [(title, f"data/{name}") for name, title in DATA_FIGURES.items()]


def summary_line(metrics: Mapping) -> str:
    """The line the stage prints: test accuracy with its interval, macro F1, balanced accuracy, ROC AUC where
    defined, ECE, and with more than two classes the three worst classes by recall."""
    m, h = metrics, headline_metrics(metrics)
    worst = ", ".join(f"{name} {m['per_class'][name]['recall']:.2f}" for name in m["worst_classes"])
    return (f"test accuracy {m['accuracy']:.4f} (95 % interval {h['test_accuracy_low']:.3f}-"
            f"{h['test_accuracy_high']:.3f}, {h['test_images']} images)  macro F1 {m['macro_f1']:.4f}"
            f"  balanced accuracy {m['balanced_accuracy']:.4f}"
            + (f"  ROC AUC {m['roc_auc']:.4f}" if "roc_auc" in m else "") + f"  ECE {m['ece']:.4f}"
            + (f"  worst recall: {worst}" if len(m["per_class"]) > 2 else ""))


def write_curves(result: Evaluation) -> list[Path]:
    """One ROC and one precision-recall table per curve, named after its class; stale classes are removed."""
    files = []
    for folder, table in ((ROC_DIR, "roc"), (PR_DIR, "pr")):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for c in result.curves:
            path = folder / f"{file_name(c.name)}.csv"
            getattr(c, table).to_csv(path, index=False)
            files.append(path)
    return files


def write_figures(result: Evaluation, *, top_losses: int, calibration_bins: int) -> list[Path]:
    """The top-loss grids (plain and Grad-CAM), the confusion matrix, the reliability diagram, where there are
    curves ROC and PR, and with more than two classes recall and precision per class; returns the PNGs in that
    order."""
    top = result.top_losses(top_losses)
    images, captions = [np.array(result.images[i]) for i in top], result.captions(top)
    colors = ["black" if result.labels[i] == result.predicted[i] else "tab:red" for i in top]
    what = f"the {len(top)} test images with the highest loss, highest first (red: wrong)"
    figures = [
        image_grid(images, captions, FIGURES / "top_losses.png", f"Top losses: {what}", colors=colors),
        image_grid(images, captions, FIGURES / "top_losses_gradcam.png",
                   f"Grad-CAM of the predicted class (heat: evidence) on {what}", heat=result.cams(top), colors=colors),
        confusion_png(np.array(result.metrics["confusion_matrix"]), result.classes, FIGURES / "confusion_matrix.png"),
        reliability_png(result.reliability, result.metrics["ece"], calibration_bins, FIGURES / "reliability.png"),
    ]
    if result.curves:
        figures += [roc_png(result.curves, FIGURES / "roc.png"), pr_png(result.curves, FIGURES / "pr.png")]
    if len(result.classes) > 2:  # two classes: the confusion matrix already says it all
        figures.append(per_class_png(result.metrics["per_class"], FIGURES / "per_class.png"))
    return figures
