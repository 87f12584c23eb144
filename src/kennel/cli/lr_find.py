"""``python -m kennel lr-find``: the learning-rate range test on the train split, plotted, printed and recorded as an
MLflow run of its own (the pipeline's outputs are untouched)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from kennel import track
from kennel.cli.command import PARAMS, command_parser, positive_float, positive_int
from kennel.core.params import Params, load_params
from kennel.core.paths import AUDITED, project_root
from kennel.train.lr_find import LRFind, lr_find, plot


def run(argv: Sequence[str]) -> int:
    """``python -m kennel lr-find [--params FILE] [--steps N] [--output PNG]``: run, plot, print, record."""
    parser = command_parser("lr-find", __doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("--steps", type=positive_int, default=100, help="batches, one lr each (default 100)")
    parser.add_argument("--start-lr", type=positive_float, default=1e-7)
    parser.add_argument("--end-lr", type=positive_float, default=10.0)
    parser.add_argument("--output", type=Path, default=Path("reports/lr_find.png"), help="the plot (PNG)")
    args = parser.parse_args(argv)
    if args.start_lr >= args.end_lr:
        parser.error(f"--start-lr {args.start_lr:g} must be below --end-lr {args.end_lr:g}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lr-find %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    root = project_root()
    params = load_params(root / args.params)
    if not (root / AUDITED / "classes.json").exists():
        raise FileNotFoundError(f"{root / AUDITED}: no audited splits; run `dvc repro audit` first")
    result = lr_find(params, root / AUDITED, args.steps, args.start_lr, args.end_lr)
    png = plot(result, root / args.output)
    record(result, params, png, root)
    print(f"suggested learning rate: {result.suggestion:.3g} (train.lr); {len(result.lrs)} steps, plot {png}"
          if math.isfinite(result.suggestion) else
          f"no suggested learning rate: {len(result.lrs)} steps are too few, or the loss never fell; plot {png}")
    print(f"swept {result.swept}")
    return 0


def record(result: LRFind, params: Params, png: Path, root: Path) -> None:
    """The sweep as an MLflow run of its own (kind lr-find: `compare` never picks it for a name)."""
    name = f"lr-find-{params.model.arch}-{params.model.finetune}"
    with track.open_run(root, params.mlflow.experiment, run_name=name,
                        tags={**track.provenance_tags(root), "kennel.kind": "lr-find"}):
        track.log_params(params.flat())
        for i, (lr, loss) in enumerate(zip(result.lrs, result.losses, strict=True)):
            track.log_metrics({"lr_find_lr": lr, "lr_find_loss": loss}, step=i)
        track.log_metrics({"lr_suggestion": result.suggestion})
        track.set_tags({"kennel.lr_suggestion": f"{result.suggestion:.3g}", "kennel.lr_find_swept": result.swept})
        track.log_artifacts([png], "lr_find")
