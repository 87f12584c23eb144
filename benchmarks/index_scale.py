"""The neighbour search past ``audit.exact_search_max``: an HNSW graph's recall against the exact search, and times.

    python benchmarks/index_scale.py [--sizes 100000 200000] [--work DIR] [--queries 2000]

N vectors are views of real embeddings: the audit's MobileNetV2 vectors of the 3,000 real images that
``benchmarks/outliers.py`` caches in ``--work`` (pets, EuroSAT, X-rays), each view the vector plus Gaussian noise of
norm 0.33 (cosine ~0.95 to its source, ~0.9 to another view of it), re-normalised. For each N,
``kennel.audit.neighbours.nearest`` builds the graph and finds the 10 nearest of all N (seconds), and the exact
search (faiss flat inner product) answers ``--queries`` random ones: recall@10 and of the nearest, and the exact
search's time for all N extrapolated from them (it grows with N^2).

Near-copy pairs (``--plant`` P): the last P of the N vectors are replaced by copies of P random others (the vector
plus Gaussian noise of norm 0.2: cosine ~0.98 to it, where the other views of its source sit at ~0.9). The audit's
rule (``margin_pairs`` at the shipped ``audit.duplicate_floor`` and ``duplicate_margin``) runs on the exact
neighbours and on the graph's of the 2P rows involved: the pairs the graph finds of those the exact search finds.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np
import yaml
from hostinfo import machine

REPO = Path(__file__).resolve().parents[1]


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


def plant(x: np.ndarray, p: int, seed: int = 2) -> np.ndarray:
    """Replace the last ``p`` rows of ``x`` by near-copies of ``p`` random earlier ones; returns those originals."""
    rng = np.random.default_rng(seed)
    n = len(x)
    originals = rng.choice(n - p, size=p, replace=False)
    noise = rng.normal(size=(p, x.shape[1])).astype(np.float32)
    noise *= 0.2 / np.linalg.norm(noise, axis=1, keepdims=True)
    copies = x[originals] + noise
    x[n - p:] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return originals


def pairs_on(rows: np.ndarray, sims: np.ndarray, ids: np.ndarray, n: int, floor: float, margin: float) -> set:
    """The audit's near-copy pairs from the neighbour lists of ``rows`` alone (``sims``/``ids``: one per row)."""
    from kennel.audit.neighbours import margin_pairs

    full_sims = np.full((n, sims.shape[1]), -np.inf, np.float32)
    full_ids = np.full((n, ids.shape[1]), -1, np.int64)
    full_sims[rows], full_ids[rows] = sims, ids
    found = margin_pairs(full_sims, full_ids, floor, margin)
    return set(zip(found["a"], found["b"], strict=True))


def main(argv=None) -> int:
    import faiss

    from kennel.audit import neighbours
    from kennel.audit.neighbours import NEIGHBOURS, nearest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100000, 200000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kennel-outliers"))
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--plant", type=int, default=2000, help="near-copy pairs planted among the N (0: none)")
    parser.add_argument("--ef-search", type=int, help="the graph's search beam (default: the audit's)")
    parser.add_argument("--ef-construction", type=int, help="the graph's build beam (default: the audit's)")
    args = parser.parse_args(argv)
    neighbours.HNSW_SEARCH = args.ef_search or neighbours.HNSW_SEARCH
    neighbours.HNSW_BUILD = args.ef_construction or neighbours.HNSW_BUILD
    HNSW_LINKS, HNSW_BUILD, HNSW_SEARCH = neighbours.HNSW_LINKS, neighbours.HNSW_BUILD, neighbours.HNSW_SEARCH
    audit = yaml.safe_load((REPO / "params.yaml").read_text())["audit"]
    floor, margin = audit["duplicate_floor"], audit["duplicate_margin"]
    base = np.concatenate([np.load(args.work / f"{name}.npz")["x"] for name in ("pets", "eurosat", "xray")])
    base = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)
    print(f"## HNSW (M {HNSW_LINKS}, efConstruction {HNSW_BUILD}, efSearch {HNSW_SEARCH}) against exact: {machine()}, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; views of {len(base)} real "
          f"{base.shape[1]}-d embeddings\n")
    print("| vectors | HNSW build + search, all N (s) | recall@10 | nearest found | exact, sampled queries (s) | "
          "exact, all N (extrapolated s) | near-copy pairs: exact finds | graph finds of them | planted: exact / "
          "graph |\n|---|---|---|---|---|---|---|---|---|")
    k = NEIGHBOURS
    for n in args.sizes:
        x = views(base, n)
        originals = plant(x, args.plant) if args.plant else np.empty(0, np.int64)
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
        pairs = ""
        if args.plant:
            rows = np.concatenate([originals, np.arange(n - args.plant, n)])
            esims, eids = flat.search(x[rows], k + 1)
            own = eids == rows[:, None]
            order = np.argsort(own, axis=1, kind="stable")[:, :k]  # drop each row's own entry, keep the order
            esims, eids = np.take_along_axis(esims, order, 1), np.take_along_axis(eids, order, 1)
            exact_pairs = pairs_on(rows, esims, eids, n, floor, margin)
            graph_pairs = pairs_on(rows, sims[rows], ids[rows], n, floor, margin)
            truth = {(min(a, b), max(a, b)) for a, b in zip(originals, range(n - args.plant, n), strict=True)}
            pairs = (f" {len(exact_pairs)} | {len(graph_pairs & exact_pairs) / max(len(exact_pairs), 1):.4f} | "
                     f"{len(truth & exact_pairs) / len(truth):.4f} / {len(truth & graph_pairs) / len(truth):.4f} |")
        print(f"| {n} | {graph_s:.0f} | {recall:.3f} | {first:.3f} | {exact_s:.1f} ({args.queries}) | "
              f"{exact_s * n / args.queries:.0f} |{pairs}", flush=True)
        del x, flat
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
