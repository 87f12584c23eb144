"""audit: near-copies of one photo within and across splits (each group kept in one split for train and evaluate),
every image ranked for label review (cleanlab on out-of-sample probabilities from the embeddings), and every image
ranked by how far it sits from every class (outliers).

Vectors per image (pretrained pooled features, or a perceptual hash without pretrained weights) are cached in
``data/embeddings`` (a persisted output), so a grown dataset computes only its new images.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import numpy as np
import pandas as pd

from kennel.audit.figures import OUTLIERS_SHOWN, outlier_figure, pair_figure
from kennel.audit.label_figures import TOP, label_issues_png
from kennel.audit.labels import CSV_COLUMNS, label_issues, write_label_issues
from kennel.audit.near_duplicates import find_near_duplicates
from kennel.audit.outliers import CSV_COLUMNS as OUTLIER_COLUMNS
from kennel.audit.outliers import outlier_scores, outlier_table
from kennel.audit.report import audit_metrics
from kennel.audit.splits import write_audited
from kennel.core.params import Params
from kennel.core.paths import (
    AUDIT_METRICS,
    AUDIT_REPORT,
    AUDITED,
    EMBEDDINGS,
    LABEL_ISSUES,
    LABEL_ISSUES_FIGURE,
    MANIFEST,
    NEAR_DUPLICATES,
    NEAR_DUPLICATES_FIGURE,
    OUTLIERS,
    OUTLIERS_FIGURE,
    RESIZED,
)
from kennel.core.stage import run_stage
from kennel.data.manifest import read_manifest, write_csv
from kennel.data.shards import read_meta

log = logging.getLogger("kennel.audit")


def audit(params: Params) -> None:
    a = params.audit
    start = time.perf_counter()
    found = find_near_duplicates(RESIZED, read_manifest(MANIFEST), EMBEDDINGS, a, arch=params.model.arch,
                                 weights=params.model.weights, device=params.train.device, amp=params.train.amp)
    # pretrained features: training's frozen phases read them from the cache instead of computing them again
    write_audited(AUDITED, found.audited, RESIZED, read_meta(RESIZED),
                  features=EMBEDDINGS if found.kind == "embedding" else None)
    AUDIT_REPORT.mkdir(parents=True, exist_ok=True)
    write_csv(found.table, NEAR_DUPLICATES)
    measure = "cosine" if found.kind == "embedding" else "perceptual hash"
    pair_figure(found.pairs, found.groups, found.table, found.images, found.paths, NEAR_DUPLICATES_FIGURE,
                a.figure_pairs, measure)
    metrics = audit_metrics(found.table, len(found.index), found.moved)

    metrics["audit_label_issues"] = check_labels(found, params.seed)
    metrics["audit_outliers"] = check_outliers(found, a.outlier_score)

    AUDIT_METRICS.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("%d images, %d computed (the rest cached) in %.1fs, neighbours in %.1fs: %d group(s) of near-copies "
             "(%d images), %d across splits, %d with conflicting labels; %d image(s) moved to keep groups in one "
             "split%s; %.1fs in all, see %s", metrics["audit_images"], found.computed, found.seconds["features"],
             found.seconds["neighbours"], metrics["audit_duplicate_groups"], metrics["audit_duplicate_images"],
             metrics["audit_leak_groups"], metrics["audit_conflicting_groups"], metrics["audit_moved_images"],
             "" if a.group_splits else " (audit.group_splits: false)", time.perf_counter() - start, NEAR_DUPLICATES)


def check_labels(found, seed: int) -> int:
    """Every image ranked for label review (cleanlab's flagged first) -> label_issues.csv and a grid of the top;
    how many were flagged. A hash says nothing about what is in a photo, so without pretrained features the report
    is empty and says why."""
    if found.kind != "embedding":
        log.info("label checks skipped: they need pretrained features (model.weights)")
        none = pd.DataFrame(columns=CSV_COLUMNS)
        write_csv(none, LABEL_ISSUES)
        label_issues_png(none, LABEL_ISSUES_FIGURE, images=[],
                         title="Labels not checked: that needs pretrained features (model.weights)")
        return 0
    classes, labels = _labels(found)
    issues = label_issues(found.features.block(0, len(found.features)), labels, classes, seed=seed)
    table = write_label_issues(issues, _images(found), LABEL_ISSUES)
    shown = issues.sort_values("rank")["index"].to_numpy()[:TOP]
    label_issues_png(table, LABEL_ISSUES_FIGURE, images=[found.images[int(i)] for i in shown])
    flagged = int(issues["is_issue"].sum())
    log.info("%d suspected label error(s) of %d images (all ranked), see %s", flagged, len(issues), LABEL_ISSUES)
    return flagged


def check_outliers(found, cut: float) -> int:
    """Every image ranked by how far it sits from every class -> outliers.csv and a grid of the most outlying; how
    many score at or above ``cut``. Without pretrained features the report is empty and says why."""
    if found.kind != "embedding":
        write_csv(pd.DataFrame(columns=OUTLIER_COLUMNS), OUTLIERS)
        outlier_figure(pd.DataFrame(columns=OUTLIER_COLUMNS), [], OUTLIERS_FIGURE,
                       title="Outliers not checked: that needs pretrained features (model.weights)")
        return 0
    classes, labels = _labels(found)
    ranked = outlier_scores(found.features.block(0, len(found.features)), labels, classes)
    table = outlier_table(ranked, _images(found))
    write_csv(table, OUTLIERS)
    outlier_figure(table, [found.images[int(i)] for i in ranked["index"].head(OUTLIERS_SHOWN)], OUTLIERS_FIGURE)
    count = int((table["score"] >= cut).sum())
    log.info("%d outlier(s) of %d images (score >= audit.outlier_score %s), see %s", count, len(table), cut,
             OUTLIERS)
    return count


def _labels(found) -> tuple[list[str], np.ndarray]:
    """The classes, and each index row's class index."""
    classes = read_meta(RESIZED)["classes"]
    return classes, found.index["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)


def _images(found) -> pd.DataFrame:
    """Path, sha1, label and audited split per index row."""
    return pd.DataFrame({"path": found.paths, "sha1": found.index["sha1"].to_numpy(),
                         "label": found.index["label"].to_numpy(), "split": found.audited["split"].to_numpy()})


def main(argv=None) -> int:
    return run_stage("audit", audit, argv)


if __name__ == "__main__":
    sys.exit(main())
