"""The neighbour search past ``audit.exact_search_max``: an HNSW graph's recall against the exact search, and times.

    python benchmarks/index_scale.py [--sizes 100000 200000] [--work DIR] [--queries 2000]

N vectors are views of real embeddings: the audit's MobileNetV2 vectors of the 3,000 real images that
``benchmarks/outliers.py`` caches in ``--work`` (pets, EuroSAT, X-rays), each view the vector plus Gaussian noise of
norm 0.33 (cosine ~0.95 to its source, ~0.9 to another view of it), re-normalised. For each N,
``kennel.audit.neighbours.nearest`` builds the graph and finds the 10 nearest of all N (seconds), and the exact
search (faiss flat inner product) answers ``--queries`` random ones: recall@10 and of the nearest, and the exact
search's time for all N extrapolated from them (it grows with N^2).
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np
from hostinfo import machine


def row_block(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    return x[start:stop]


def views(base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    for start in range(0, n, 20000):
        stop = min(n, start + 20000)
        noise = rng.normal(size=(stop - start, base.shape[1])).astype(np.float32)
        noise *= 0.33 / np.linalg.norm(noise, axis=1, keepdims=True)
        chunk = base[np.arange(start, stop) % len(base)] + noise
        out[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def main(argv=None) -> int:
    import faiss

    from kennel.audit.neighbours import HNSW_BUILD, HNSW_LINKS, HNSW_SEARCH, NEIGHBOURS, nearest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100000, 200000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kennel-outliers"))
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args(argv)
    base = np.concatenate([np.load(args.work / f"{name}.npz")["x"] for name in ("pets", "eurosat", "xray")])
    base = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)
    print(f"## HNSW (M {HNSW_LINKS}, efConstruction {HNSW_BUILD}, efSearch {HNSW_SEARCH}) against exact: {machine()}, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; views of {len(base)} real "
          f"{base.shape[1]}-d embeddings\n")
    print("| vectors | HNSW build + search, all N (s) | recall@10 | nearest found | exact, sampled queries (s) | "
          "exact, all N (extrapolated s) |\n|---|---|---|---|---|---|")
    k = NEIGHBOURS
    for n in args.sizes:
        x = views(base, n)
        start = time.perf_counter()
        sims, ids = nearest(partial(row_block, x), n, k, exact_max=0)
        graph_s = time.perf_counter() - start
        rows = np.random.default_rng(1).choice(n, size=args.queries, replace=False)
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        start = time.perf_counter()
        _, exact = flat.search(x[rows], k + 1)
        exact_s = time.perf_counter() - start
        exact = [[j for j in row if j != r][:k] for row, r in zip(exact, rows, strict=True)]
        recall = np.mean([len(set(e) & set(ids[r])) / k for e, r in zip(exact, rows, strict=True)])
        first = np.mean([e[0] == ids[r][0] for e, r in zip(exact, rows, strict=True)])
        print(f"| {n} | {graph_s:.0f} | {recall:.3f} | {first:.3f} | {exact_s:.1f} ({args.queries}) | "
              f"{exact_s * n / args.queries:.0f} |", flush=True)
        del x, flat
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
