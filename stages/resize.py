"""resize: every manifest image -> one uint8 N x 3 x S x S memory-mapped .npy per split."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from kennel.config import Params
from kennel.data.images import load_array
from kennel.data.manifest import read_manifest
from kennel.data.tensors import write_splits
from kennel.stage import run_stage

MANIFEST = Path("data/prepared/manifest.csv")
OUT = Path("data/resized")
log = logging.getLogger("kennel.resize")


def resize(params: Params) -> None:
    manifest = read_manifest(MANIFEST)
    start = time.perf_counter()
    counts = write_splits(
        manifest, Path.cwd(), params.resize.size, OUT, load_array,
        progress=lambda it, desc: tqdm(it, desc=f"resize {desc}", unit="img", disable=None),
    )
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    log.info("%d images (%s) at %dpx in %.1fs, %.0f img/s", total, counts, params.resize.size, seconds, total / seconds)


def main(argv=None) -> int:
    return run_stage("resize", resize, argv)


if __name__ == "__main__":
    sys.exit(main())
