"""audit: near-copies of one photo within and across splits (each group kept in one split for train and evaluate),
and suspected label errors (cleanlab on out-of-sample probabilities from the embeddings).

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

from kennel.audit.figures import pair_figure
from kennel.audit.label_figures import label_issues_png
from kennel.audit.labels import CSV_COLUMNS, label_issues, write_label_issues
from kennel.audit.near_duplicates import find_near_duplicates
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
    write_audited(AUDITED, found.audited, RESIZED, read_meta(RESIZED))
    AUDIT_REPORT.mkdir(parents=True, exist_ok=True)
    write_csv(found.table, NEAR_DUPLICATES)
    measure = "cosine" if found.kind == "embedding" else "perceptual hash"
    pair_figure(found.pairs, found.groups, found.table, found.images, found.paths, NEAR_DUPLICATES_FIGURE,
                a.figure_pairs, measure)
    metrics = audit_metrics(found.table, len(found.index), found.moved)

    metrics["audit_label_issues"] = check_labels(found, params.seed)

    AUDIT_METRICS.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("%d images, %d computed (the rest cached) in %.1fs, neighbours in %.1fs: %d group(s) of near-copies "
             "(%d images), %d across splits, %d with conflicting labels; %d image(s) moved to keep groups in one "
             "split%s; %.1fs in all, see %s", metrics["audit_images"], found.computed, found.seconds["features"],
             found.seconds["neighbours"], metrics["audit_duplicate_groups"], metrics["audit_duplicate_images"],
             metrics["audit_leak_groups"], metrics["audit_conflicting_groups"], metrics["audit_moved_images"],
             "" if a.group_splits else " (audit.group_splits: false)", time.perf_counter() - start, NEAR_DUPLICATES)


def check_labels(found, seed: int) -> int:
    """Suspected label errors -> label_issues.csv and its grid; how many were flagged. A hash says nothing about
    what is in a photo, so without pretrained features the report is empty and says why."""
    if found.kind != "embedding":
        log.info("label checks skipped: they need pretrained features (model.weights)")
        none = pd.DataFrame(columns=CSV_COLUMNS)
        write_csv(none, LABEL_ISSUES)
        label_issues_png(none, LABEL_ISSUES_FIGURE, images=[],
                         title="Labels not checked: that needs pretrained features (model.weights)")
        return 0
    classes = read_meta(RESIZED)["classes"]
    labels = found.index["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    issues = label_issues(found.features.block(0, len(found.features)), labels, classes, seed=seed)
    images = pd.DataFrame({"path": found.paths, "sha1": found.index["sha1"].to_numpy(),
                           "split": found.audited["split"].to_numpy()})
    table = write_label_issues(issues, images, LABEL_ISSUES)
    flagged = issues.loc[issues["is_issue"]].sort_values("rank")["index"].to_numpy()[:16]
    label_issues_png(table, LABEL_ISSUES_FIGURE, images=[found.images[int(i)] for i in flagged])
    log.info("%d suspected label error(s) of %d images, see %s", len(table), len(issues), LABEL_ISSUES)
    return len(table)


def main(argv=None) -> int:
    return run_stage("audit", audit, argv)


if __name__ == "__main__":
    sys.exit(main())
