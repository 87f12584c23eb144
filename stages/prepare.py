"""prepare: find the images of ``data.source`` and write the manifest with its train/val/test split."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from kennel.config import Params
from kennel.data.manifest import build_manifest, write_manifest
from kennel.data.sources import find_images
from kennel.stage import run_stage

OUT = Path("data/prepared")
log = logging.getLogger("kennel.prepare")


def prepare(params: Params) -> None:
    d = params.data
    shutil.rmtree(OUT, ignore_errors=True)  # a stale synthetic set must not survive a source change
    entries = find_images(d.source, Path(d.raw_dir), out_dir=OUT, seed=params.seed, per_class=d.synthetic_per_class)
    manifest = build_manifest(entries, Path.cwd(), d.val_fraction, d.test_fraction, params.seed)
    write_manifest(manifest, OUT / "manifest.csv")
    counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
    log.info("%d images from %s source:\n%s", len(manifest), d.source, counts.to_string())


def main(argv=None) -> int:
    return run_stage("prepare", prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
