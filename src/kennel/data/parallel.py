"""Map a function over items in worker processes, in order, with a progress bar."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(workers: int | str) -> int:
    """``auto`` = the CPUs this process may use (cgroup/affinity aware where the OS says)."""
    if workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # macOS, Windows
            return max(1, os.cpu_count() or 1)
    return max(1, int(workers))


def pmap(
    func: Callable[[T], R], items: Sequence[T], workers: int | str = "auto", desc: str = "", unit: str = "img",
    chunksize: int = 16,
) -> Iterator[R]:
    """Results of ``func`` over ``items`` in order; one process when there is one worker or few items."""
    n = resolve_workers(workers)
    progress = dict(total=len(items), desc=desc, unit=unit, disable=None, leave=False)
    if n == 1 or len(items) < 2 * chunksize:
        yield from tqdm(map(func, items), **progress)
        return
    # fork starts in milliseconds; the workers only decode images and never touch torch or threads.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(n) as pool:
        yield from tqdm(pool.imap(func, items, chunksize=chunksize), **progress)
