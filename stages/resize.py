"""resize: every manifest image -> one uint8 N x 3 x S x S .npy per split, decoded in parallel."""

from __future__ import annotations

import logging
import sys
import time
from functools import partial
from pathlib import Path

from kennel.config import Params
from kennel.data.images import load_array
from kennel.data.manifest import read_manifest
from kennel.data.parallel import resolve_workers
from kennel.data.tensors import write_splits
from kennel.paths import MANIFEST, RESIZED
from kennel.stage import run_stage

log = logging.getLogger("kennel.resize")


def resize(params: Params) -> None:
    r = params.resize
    manifest = read_manifest(MANIFEST)
    start = time.perf_counter()
    load = partial(load_array, mode=r.mode, max_pixels=params.data.max_pixels)
    counts = write_splits(manifest, Path.cwd(), r.size, RESIZED, load, r.workers, recipe=r.mode)
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    log.info("resized %d images (%s) to %dpx %s with %d workers in %.1fs: %.0f img/s",
             total, counts, r.size, r.mode, resolve_workers(r.workers), seconds, total / max(seconds, 1e-9))


def main(argv=None) -> int:
    return run_stage("resize", resize, argv)


if __name__ == "__main__":
    sys.exit(main())
