"""Pairs of images closer than a threshold, or nearest neighbours that stand out from the rest, and the groups they
chain into.

Cosine pairs are found block against block with faiss (an exact inner-product index over one block, a range
search with another): memory holds two blocks and the pairs found, never an N x N matrix; time grows with N^2
(measured and extrapolated in benchmarks/RESULTS.md). Hash pairs use faiss's binary index (Hamming distance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import faiss
import numpy as np
import pandas as pd
from tqdm import tqdm

log = logging.getLogger(__name__)

NEIGHBOURS = 10  # nearest neighbours kept per image: a group of copies and the level around it
BLOCK = 8192  # vectors per block: two blocks of 1280 float32 features are 80 MB
PAIR_COLUMNS = ["a", "b", "similarity"]  # positions a < b, and how alike: cosine, or 1 - bits / hash bits


def cosine_pairs(block: Callable[[int, int], np.ndarray], n: int, threshold: float, size: int = BLOCK) -> pd.DataFrame:
    """Every pair of the ``n`` L2-normalised vectors (``block(start, stop)`` reads rows) with cosine similarity at
    or above ``threshold``."""
    starts = list(range(0, n, size))
    found = []
    bar = tqdm(total=len(starts) * (len(starts) + 1) // 2, desc="neighbours", unit="block", disable=None,
               leave=False)
    for i, qi in enumerate(starts):
        queries = np.ascontiguousarray(block(qi, qi + size), dtype=np.float32)
        for qj in starts[i:]:
            base = queries if qj == qi else np.ascontiguousarray(block(qj, qj + size), dtype=np.float32)
            index = faiss.IndexFlatIP(base.shape[1])
            index.add(base)
            # faiss keeps similarities strictly above the radius; float16 storage rounds at ~1e-3 anyway
            lims, sims, ids = index.range_search(queries, float(np.nextafter(np.float32(threshold), -1)))
            a = np.repeat(np.arange(len(queries)), np.diff(lims.astype(np.int64))) + qi
            b = ids.astype(np.int64) + qj
            keep = a < b
            found.append(pd.DataFrame({"a": a[keep], "b": b[keep], "similarity": sims[keep].astype(np.float64)}))
            bar.update()
    bar.close()
    return _tidy(found)


def nearest(block: Callable[[int, int], np.ndarray], n: int, k: int, size: int = BLOCK,
            exact_max: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar other vectors of each of the ``n`` L2-normalised vectors: (N x k cosine similarities,
    most similar first; N x k positions, -1 where fewer than ``k`` others exist). Exact, block against block (memory
    holds two blocks and the N x k answer; time grows with N^2) up to ``exact_max`` vectors; past it, a faiss HNSW
    graph (all vectors and the graph in memory; time grows with about N log N; recall against the exact search
    measured in benchmarks/RESULTS.md)."""
    k = max(1, k)
    if exact_max is not None and n > exact_max:
        return _nearest_hnsw(block, n, k, size)
    starts = list(range(0, n, size))
    best_sims = np.full((n, k), -np.inf, dtype=np.float32)
    best_ids = np.full((n, k), -1, dtype=np.int64)
    bar = tqdm(total=len(starts) ** 2, desc="neighbours", unit="block", disable=None, leave=False)
    for qi in starts:
        queries = np.ascontiguousarray(block(qi, qi + size), dtype=np.float32)
        rows = slice(qi, qi + len(queries))
        for qj in starts:
            base = queries if qj == qi else np.ascontiguousarray(block(qj, qj + size), dtype=np.float32)
            index = faiss.IndexFlatIP(base.shape[1])
            index.add(base)
            sims, ids = index.search(queries, min(k + 1, len(base)))
            ids = np.where(ids >= 0, ids + qj, -1)
            own = ids == np.arange(qi, qi + len(queries))[:, None]  # an image is not its own neighbour
            sims = np.where(own | (ids < 0), -np.inf, sims)
            merged_sims = np.concatenate([best_sims[rows], sims], axis=1)
            merged_ids = np.concatenate([best_ids[rows], ids], axis=1)
            order = np.argsort(-merged_sims, axis=1, kind="stable")[:, :k]
            best_sims[rows] = np.take_along_axis(merged_sims, order, axis=1)
            best_ids[rows] = np.take_along_axis(merged_ids, order, axis=1)
            bar.update()
    bar.close()
    best_ids[~np.isfinite(best_sims)] = -1
    return best_sims, best_ids


HNSW_LINKS, HNSW_BUILD, HNSW_SEARCH = 32, 160, 128  # graph degree, build and search beam: see RESULTS.md


def _nearest_hnsw(block: Callable[[int, int], np.ndarray], n: int, k: int,
                  size: int) -> tuple[np.ndarray, np.ndarray]:
    first = np.ascontiguousarray(block(0, size), dtype=np.float32)
    index = faiss.IndexHNSWFlat(first.shape[1], HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_BUILD
    index.add(first)
    for start in tqdm(range(size, n, size), desc="index", unit="block", disable=None, leave=False):
        index.add(np.ascontiguousarray(block(start, start + size), dtype=np.float32))
    index.hnsw.efSearch = max(HNSW_SEARCH, k + 1)
    sims = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    for start in tqdm(range(0, n, size), desc="neighbours", unit="block", disable=None, leave=False):
        queries = np.ascontiguousarray(block(start, start + size), dtype=np.float32)
        found_sims, found_ids = index.search(queries, k + 1)
        own = found_ids == np.arange(start, start + len(queries))[:, None]
        found_sims = np.where(own | (found_ids < 0), -np.inf, found_sims)
        order = np.argsort(-found_sims, axis=1, kind="stable")[:, :k]
        sims[start:start + len(queries)] = np.take_along_axis(found_sims, order, axis=1)
        ids[start:start + len(queries)] = np.take_along_axis(found_ids, order, axis=1)
    ids[~np.isfinite(sims)] = -1
    return sims, ids


def margin_pairs(sims: np.ndarray, ids: np.ndarray, floor: float, margin: float) -> pd.DataFrame:
    """The near-copies among each image's nearest neighbours (``nearest``: similarities most similar first): the
    neighbours before the last drop of at least ``margin`` from one neighbour to the next, among those at or above
    ``floor``. A copy sits far closer to its original (and to the original's other copies) than any other image
    does, so a drop follows the group; a crowd of alike but distinct images (sea tiles, one breed's portraits,
    X-rays) is close to everything around it, with no drop, and gives no pair whatever its similarity. The last
    of the k neighbours has no next one to drop to, so it is never a copy on its own list."""
    n, k = sims.shape
    s = np.where(ids >= 0, sims, -np.inf).astype(np.float64)
    with np.errstate(invalid="ignore"):
        gap = (s[:, :-1] >= floor) & (s[:, :-1] - s[:, 1:] >= margin) & np.isfinite(s[:, 1:])
    kept = np.where(gap.any(axis=1), k - 1 - np.argmax(gap[:, ::-1], axis=1), 0)  # neighbours before the last drop
    rows, cols = np.nonzero(np.arange(k)[None, :] < kept[:, None])
    a, b, sim = rows, ids[rows, cols], s[rows, cols]
    return _tidy([pd.DataFrame({"a": np.minimum(a, b), "b": np.maximum(a, b), "similarity": sim})])


def hash_pairs(hashes: np.ndarray, max_bits: int) -> pd.DataFrame:
    """Pairs whose hashes differ in at most ``max_bits`` bits, straight or mirrored (``hashes`` N x 2B bytes: the
    hash, then the mirror's); similarity is 1 - bits / (8 B)."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint8)
    half = hashes.shape[1] // 2
    index = faiss.IndexBinaryFlat(8 * half)
    index.add(np.ascontiguousarray(hashes[:, :half]))
    found = []
    for queries in (hashes[:, :half], hashes[:, half:]):
        for start in range(0, len(hashes), BLOCK):
            block = np.ascontiguousarray(queries[start:start + BLOCK])
            lims, bits, ids = index.range_search(block, max_bits + 1)  # distances below the radius
            a = np.repeat(np.arange(len(block)), np.diff(lims.astype(np.int64))) + start
            b = ids.astype(np.int64)
            a, b = np.minimum(a, b), np.maximum(a, b)
            keep = a < b
            found.append(pd.DataFrame({"a": a[keep], "b": b[keep], "similarity": 1 - bits[keep] / (8 * half)}))
    return _tidy(found)


def _tidy(found: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per pair (its highest similarity), most similar first."""
    pairs = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=PAIR_COLUMNS)
    pairs = pairs.astype({"a": np.int64, "b": np.int64, "similarity": np.float64})
    pairs = pairs.sort_values("similarity", ascending=False, kind="stable").drop_duplicates(["a", "b"])
    return pairs.sort_values(["similarity", "a", "b"], ascending=[False, True, True]).reset_index(drop=True)


def connected_groups(n: int, pairs: pd.DataFrame) -> np.ndarray:
    """Group number per position (1, 2, ... in order of each group's most similar pair; 0 = in no pair): pairs
    chain, so a resized copy of a cropped copy joins both."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(pairs["a"], pairs["b"], strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups = np.zeros(n, dtype=np.int64)
    number: dict[int, int] = {}
    for a, b in zip(pairs["a"], pairs["b"], strict=True):  # most similar first
        r = root(a)
        if r not in number:
            number[r] = len(number) + 1
        groups[a] = groups[b] = number[r]
    return groups
