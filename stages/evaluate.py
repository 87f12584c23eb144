"""evaluate: score the trained model on the test split; write DVC metrics/plots and log them to the train run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kennel import track
from kennel.core.params import MlflowConfig, Params
from kennel.core.paths import (
    AUDIT_METRICS,
    AUDIT_REPORT,
    AUDITED,
    DATA_SUMMARY,
    MANIFEST,
    MODEL,
    RUN_FILE,
    project_root,
)
from kennel.core.stage import run_stage
from kennel.data.manifest import with_splits
from kennel.data.shards import read_index
from kennel.evaluate.evaluation import evaluate_model
from kennel.evaluate.note import run_note
from kennel.evaluate.reports import figure_links, scalar_metrics, summary_line, write_reports


def evaluate_stage(params: Params) -> None:
    e, t, mf = params.evaluate, params.train, params.mlflow
    run_id = track.read_run_file(RUN_FILE)
    result = evaluate_model(MODEL, AUDITED, MANIFEST, device=t.device, amp=t.amp, calibration_bins=e.calibration_bins,
                            params=params)
    reports = write_reports(result, top_losses=e.top_losses, calibration_bins=e.calibration_bins)
    m, root = result.metrics, project_root()
    data = with_splits(json.loads(DATA_SUMMARY.read_text()), read_index(AUDITED))  # the splits as evaluated
    with track.open_run(root, mf.experiment, run_id=run_id):
        track.log_metrics(scalar_metrics(m))
        track.log_dict(m, "evaluation/metrics.json")
        track.log_artifacts(reports.figures + reports.tables, "evaluation")
        track.log_artifacts(reports.curves, "evaluation/curves")
        # The audit's reports go on the run here, not in train: a report-only audit change must not retrain.
        track.log_artifacts(sorted(AUDIT_REPORT.glob("*")), "audit")
        track.log_metrics(json.loads(AUDIT_METRICS.read_text()))
        track.note(run_note(
            m, data, experiment_id=track.experiment_id(mf.experiment, root),
            run_id=run_id, selected_epoch=track.run_tag(run_id, "kennel.selected_epoch"),
            epochs=track.run_tag(run_id, "kennel.epochs") or t.epochs,  # train.epochs auto: what the run decided
            select=t.select, selected_reason=track.run_tag(run_id, "kennel.selected_reason"),
            figures=figure_links(reports.figures), decisions=track.run_tags_under(run_id, "kennel.decision."),
            warnings=[track.run_tag(run_id, f"kennel.{kind}_warning") for kind in ("data", "weights", "baseline")],
        ))
        if mf.registered_model:
            register(root, run_id, mf)
    print(summary_line(m))


def register(root: Path, run_id: str, mf: MlflowConfig) -> None:
    """Register the run's model under ``mlflow.registered_model`` and promote it if better; tag the run."""
    model_uri = track.run_tag(run_id, "kennel.serving_uri") or track.run_tag(run_id, "kennel.model_uri")
    reg = track.register_and_promote(root, run_id, model_uri, mf.registered_model, mf.promote_if_better)
    track.set_tags({"kennel.registered_version": reg.version, "kennel.promoted": str(reg.promoted).lower()})
    print(f"registered {mf.registered_model} version {reg.version}; "
          f"{'now' if reg.promoted else 'not'} champion ({reg.reason})")


def main(argv=None) -> int:
    return run_stage("evaluate", evaluate_stage, argv)


if __name__ == "__main__":
    sys.exit(main())
