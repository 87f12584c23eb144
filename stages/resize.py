"""resize: manifest images -> uint8 rows in content-addressed shards; only images not stored yet are decoded."""

from __future__ import annotations

import logging
import sys
import time
from functools import partial
from pathlib import Path

from kennel.core.params import Params
from kennel.core.paths import MANIFEST, RESIZED
from kennel.core.stage import run_stage
from kennel.data.images import load_array
from kennel.data.manifest import read_manifest
from kennel.data.parallel import resolve_workers
from kennel.data.shard_writer import write_splits

log = logging.getLogger("kennel.resize")


def resize(params: Params) -> None:
    r = params.resize
    manifest = read_manifest(MANIFEST)
    start = time.perf_counter()
    load = partial(load_array, mode=r.mode, max_pixels=params.data.max_pixels)
    done = write_splits(manifest, Path.cwd(), r.size, RESIZED, load, r.workers, recipe=r.mode)
    seconds = time.perf_counter() - start
    log.info("%d images (%s) at %dpx %s: decoded %d with %d workers, kept %d in place, copied %d from changed "
             "shards; %d shard(s) written in %.1fs: %.0f decoded img/s",
             sum(done.counts.values()), done.counts, r.size, r.mode, done.decoded, resolve_workers(r.workers),
             done.kept, done.copied, len(done.shards_written), seconds, done.decoded / max(seconds, 1e-9))


def main(argv=None) -> int:
    return run_stage("resize", resize, argv)


if __name__ == "__main__":
    sys.exit(main())
