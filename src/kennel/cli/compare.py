"""``python -m kennel compare A B [C ...]``: train runs side by side in the terminal.

Each of A, B, ... is a run id, a DVC experiment name, a git commit or ``champion``. Prints the params that differ,
the headline metrics, and, between the first two, the test images whose predictions changed most (from each
run's ``evaluation/predictions.csv``); ``--plot`` overlays their training curves in a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.ticker import MaxNLocator

from kennel.cli.command import command_parser, mlflow_names, positive_int
from kennel.core.paths import project_root
from kennel.core.plots import save_figure, subplots
from kennel.track.runs import RunView, find_train_run, load_run

HEADLINE = ("test_accuracy", "test_accuracy_low", "test_accuracy_high", "test_macro_f1", "test_balanced_accuracy",
            "test_worst_class_recall", "test_roc_auc", "test_average_precision", "test_ece", "test_images", "data_kept")
SKIP_PARAMS = ("mlflow.",)  # where a run was recorded is not how it differs


def params_table(runs: Sequence[RunView]) -> pd.DataFrame:
    """The params whose values differ between ``runs`` (a row each, a column per run); '' where one lacks it."""
    keys = sorted({k for r in runs for k in r.params if not k.startswith(SKIP_PARAMS)})
    rows = {k: [r.params.get(k, "") for r in runs] for k in keys}
    table = pd.DataFrame.from_dict({k: v for k, v in rows.items() if len(set(v)) > 1}, orient="index",
                                   columns=_labels(runs))
    return table.rename_axis("param")


def metrics_table(runs: Sequence[RunView]) -> pd.DataFrame:
    """The headline metrics (and the selected epoch) of each run; NaN where a run lacks one."""
    rows = {k: [r.metrics.get(k, float("nan")) for r in runs] for k in HEADLINE
            if any(k in r.metrics for r in runs)}
    rows["selected_epoch"] = [float(r.tags.get("kennel.selected_epoch") or "nan") for r in runs]
    return pd.DataFrame.from_dict(rows, orient="index", columns=_labels(runs)).rename_axis("metric")


def changed_images(a: RunView, b: RunView, top: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Between runs ``a`` and ``b``: (most improved, most worsened, predicted class changed) test images by loss,
    ``top`` of each, over the paths both evaluated."""
    if a.predictions is None or b.predictions is None:
        empty = pd.DataFrame(columns=["path", "true", "predicted_a", "predicted_b", "loss_a", "loss_b", "change"])
        return empty, empty, empty
    cols = ["path", "true", "predicted", "loss"]
    both = a.predictions[cols].merge(b.predictions[cols], on=["path", "true"], suffixes=("_a", "_b"))
    both["change"] = both["loss_b"] - both["loss_a"]
    improved = both.sort_values("change", kind="stable").head(top)
    worsened = both.sort_values("change", ascending=False, kind="stable").head(top)
    flipped = both[both["predicted_a"] != both["predicted_b"]].sort_values("change", kind="stable")
    return improved[improved["change"] < 0], worsened[worsened["change"] > 0], flipped


def report(runs: Sequence[RunView], top: int = 5) -> str:
    """The whole comparison as text."""
    lines = [f"{label}: {r.ref} -> run {r.run_id} ({r.name})" for label, r in zip(_labels(runs), runs, strict=True)]
    params = params_table(runs)
    lines += ["", "params that differ:" if len(params) else "params: all the same",
              *([params.to_string()] if len(params) else [])]
    metrics = metrics_table(runs).apply(lambda row: row.map(_number), axis=1)
    lines += ["", "metrics:", metrics.to_string()]
    if len(runs) >= 2:
        improved, worsened, flipped = changed_images(runs[0], runs[1], top)
        if runs[0].predictions is None or runs[1].predictions is None:
            lines += ["", "test images: not compared (a run has no evaluation/predictions.csv)"]
        else:
            show = ["path", "true", "predicted_a", "predicted_b", "loss_a", "loss_b"]
            for title, frame in ((f"most improved from A to B (top {top})", improved),
                                 (f"most worsened from A to B (top {top})", worsened),
                                 (f"predicted class changed ({len(flipped)})", flipped)):
                lines += ["", f"{title}:", frame[show].to_string(index=False, float_format=lambda v: f"{v:.3f}")
                          if len(frame) else "  none"]
    return "\n".join(lines)


def plot_curves(runs: Sequence[RunView], path: Path) -> Path:
    """Loss (log scale) and accuracy per epoch, train dashed and val solid, a colour per run."""
    fig, (loss, acc) = subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for label, view, color in zip(_labels(runs), runs, [f"C{i}" for i in range(len(runs))], strict=False):
        for split, style in (("train", "--"), ("val", "-")):
            for ax, name in ((loss, f"{split}_loss"), (acc, f"{split}_accuracy")):
                points = view.history.get(name, [])
                if points:
                    ax.plot(*zip(*points, strict=True), style, color=color, label=f"{label} {split}")
    loss.set_yscale("log")  # a first-epoch val loss of 100+ would flatten everything on a linear axis
    for ax, what in ((loss, "loss (log)"), (acc, "accuracy")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.legend(fontsize="small")
    fig.suptitle(" vs ".join(f"{label}: {r.name}" for label, r in zip(_labels(runs), runs, strict=True)),
                 fontsize=9)
    return save_figure(fig, path)


def _number(value: float) -> str:
    if value != value:  # NaN: the run lacks it
        return "-"
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.4f}"


def _labels(runs: Sequence[RunView]) -> list[str]:
    return [chr(ord("A") + i) for i in range(len(runs))]


def run(argv: Sequence[str]) -> int:
    parser = command_parser("compare", __doc__)
    parser.add_argument("refs", nargs="+", metavar="REF", help="run id, DVC experiment name, git commit or champion")
    parser.add_argument("--top", type=positive_int, default=5, metavar="N", help="images in each changed-images list")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also write the runs' training curves here")
    args = parser.parse_args(argv)
    if len(args.refs) < 2:
        parser.error("give at least two runs to compare")
    root = project_root()
    names = mlflow_names(root)
    runs = [load_run(ref, find_train_run(ref, root, names.experiment, names.registered_model), root)
            for ref in args.refs]
    print(report(runs, args.top))
    if args.plot:
        print(f"\ntraining curves: {plot_curves(runs, root / args.plot)}")  # an absolute --plot stays as it is
    return 0
