"""The run's description: how good the model is and on what data, in a few lines of Markdown for the MLflow UI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import quote

from kennel.evaluate.metrics import accuracy_interval

SELECT = {"best": "the lowest validation loss", "last": "the last epoch"}


def run_note(
    metrics: Mapping, data: Mapping, *, experiment_id: str, run_id: str, selected_epoch: str, epochs: int | str,
    select: str, figures: Sequence[tuple[str, str]], warnings: Sequence[str] = (), selected_reason: str = "",
    decisions: Mapping[str, str] | None = None,
) -> str:
    """``metrics`` as in evaluation.json, ``data`` the prepare summary, ``figures`` (title, artifact path) pairs,
    ``decisions`` what the recipe decided from the data (``{"batchnorm": "kept: ..."}``)."""
    n_test, low, high = accuracy_interval(metrics)
    scores = [f"macro F1 {metrics['macro_f1']:.3f}"]
    if "roc_auc" in metrics:
        scores.append(f"ROC AUC {metrics['roc_auc']:.3f}")
    scores.append(f"ECE {metrics['ece']:.3f}")
    per_class = data["per_class"]
    splits = "/".join(str(sum(c[s] for c in per_class.values())) for s in ("train", "val", "test"))
    reasons = ", ".join(f"{k}: {v}" for k, v in data.get("rejected_by_reason", {}).items())
    lines = [
        f"**Test accuracy {metrics['accuracy']:.3f}** (95 % interval {low:.3f}-{high:.3f}) on {n_test} test images "
        f"({', '.join(scores)}); model weights "
        f"of epoch {selected_epoch or '?'} of {epochs} (train.select: {select}, "
        f"{selected_reason or SELECT.get(select, select)}).",
        "",
        *([f"Decided from the data: {'; '.join(f'{k}: {v}' for k, v in decisions.items())}.", ""] if decisions else []),
        "Figures: " + " · ".join(f"[{title}]({artifact_link(experiment_id, run_id, path)})" for title, path in figures),
        "",
        f"Data: {data['found']} files found, {data['kept']} kept, {data['rejected']} rejected"
        + (f" ({reasons})" if reasons else "") + f"; train/val/test {splits}; classes "
        + ", ".join(f"{name} ({c['kept']})" for name, c in per_class.items()) + ".",
    ]
    for warning in reversed([w for w in warnings if w]):
        lines = [f"Warning: {warning}", ""] + lines
    return "\n".join(lines) + "\n"


def artifact_link(experiment_id: str, run_id: str, path: str) -> str:
    """A link, relative to the MLflow UI, that opens one artifact in the run's artifact browser."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{quote(path)}"
