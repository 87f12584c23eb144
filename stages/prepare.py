"""prepare: find every file of ``data.source``, decode each, and write the manifest, the rejects and a summary.

The reviewed decisions of ``data/exclude.csv`` and ``data/relabel.csv`` are applied: excluded files are rejects,
relabelled ones carry their new label. Files whose bytes ``data/scan.csv`` already describes (a persisted output)
are not decoded again, and files it knows by identity (device, inode, size, mtime) are not even read.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from kennel.core.params import Params
from kennel.core.paths import (
    DATA_METRICS,
    DATA_REPORT,
    DATA_SUMMARY,
    EXCLUDE,
    PREPARED,
    REJECTS,
    RELABEL,
    SCAN,
    SCAN_IDENTITIES,
)
from kennel.core.stage import run_stage
from kennel.core.versioning import git_tracked_files
from kennel.data.decisions import read_decisions
from kennel.data.manifest import account, check_class_sizes, write_csv
from kennel.data.report import write_data_report
from kennel.data.sources import find_images
from kennel.data.validate import file_stats, identity_table, inspect_all, read_scan, scan_table

log = logging.getLogger("kennel.prepare")


def prepare(params: Params) -> None:
    d = params.data
    start = time.perf_counter()
    decisions = read_decisions(EXCLUDE, RELABEL)  # a bad row stops the stage before any file is read
    if d.source != "synthetic" and (in_git := git_tracked_files(Path.cwd(), d.raw_dir)):
        log.warning("%s: %d files are tracked by git, so `dvc add %s` refuses the folder; to version the images "
                    "with DVC instead, run `git rm -r --cached %s && dvc add %s`",
                    d.raw_dir, len(in_git), d.raw_dir, d.raw_dir, d.raw_dir)
    shutil.rmtree(PREPARED, ignore_errors=True)  # a stale synthetic set or extraction must not survive a source change
    candidates = find_images(
        d.source, Path(d.raw_dir), out_dir=PREPARED, seed=params.seed, per_class=d.synthetic_per_class,
        oxford_target=d.oxford_target,
    )
    decisions.check_labels({c.label for c in candidates if c.label})
    stats = file_stats([c.path for c in candidates])
    seen = read_scan(SCAN, SCAN_IDENTITIES)
    inspections = inspect_all(candidates, d.min_size, d.max_pixels, d.workers, seen=seen, stats=stats)
    acc = account(candidates, inspections, Path.cwd(), d.val_fraction, d.test_fraction, params.seed, decisions)
    write_csv(scan_table(acc.paths, inspections), SCAN)
    write_csv(identity_table(stats, inspections), SCAN_IDENTITIES)
    # The reports are written before the class-size check so that a failing run still says what was rejected.
    write_csv(acc.rejects, REJECTS)
    DATA_SUMMARY.write_text(json.dumps(acc.summary, indent=2) + "\n")
    DATA_METRICS.write_text(json.dumps({f"data_{k}": acc.summary[k] for k in ("found", "kept", "rejected")},
                                       indent=2) + "\n")
    write_data_report(acc.manifest, acc.rejects, acc.summary, Path.cwd(), DATA_REPORT, params.seed, d.max_pixels)
    check_class_sizes(acc, [c.label for c in candidates if c.label], d.min_per_class)
    write_csv(acc.manifest, PREPARED / "manifest.csv")
    s = acc.summary
    log.info("found %d files: kept %d, rejected %d %s in %.1fs; rejects listed in %s",
             s["found"], s["kept"], s["rejected"], s["rejected_by_reason"] or "", time.perf_counter() - start, REJECTS)
    if s["relabelled"]:
        log.info("relabelled %d image(s) per %s: %s", s["relabelled"], RELABEL,
                 ", ".join(f"{k}: {v}" for k, v in s["relabelled_by_class"].items()))
    for label, c in s["per_class"].items():
        log.info("  %-20s found %5d  kept %5d  rejected %4d  train/val/test %d/%d/%d",
                 label, c["found"], c["kept"], c["rejected"], c["train"], c["val"], c["test"])


def main(argv=None) -> int:
    return run_stage("prepare", prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
