"""From the resized images to groups of near-copies and the split assignment that keeps each group together."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kennel.audit.embeddings import choose_featurizer
from kennel.audit.neighbours import NEIGHBOURS, connected_groups, hash_pairs, margin_pairs, nearest
from kennel.audit.report import duplicate_table
from kennel.audit.splits import keep_groups_together
from kennel.core.params import AuditConfig
from kennel.data.shards import ShardedImages, read_index, read_meta, shard_folder
from kennel.data.vectors import FeatureCache, update_cache

log = logging.getLogger(__name__)


class _Batches:
    """The images a batch at a time, unmapped after each: memory stays flat over a pass through every image."""

    def __init__(self, images: ShardedImages):
        self.images = images

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        try:
            return self.images[positions]
        finally:
            self.images.release()


@dataclass
class Audit:
    kind: str  # "embedding" or "phash": what the images were compared by
    features: FeatureCache  # one vector per index row
    computed: int  # vectors computed this run (the rest came from the cache)
    pairs: pd.DataFrame  # a < b positions in the index, similarity; most similar first
    groups: np.ndarray  # group number per index row, 0 = none
    index: pd.DataFrame  # the resized index (hash splits)
    audited: pd.DataFrame  # the same rows, splits as train and evaluate will read them
    table: pd.DataFrame  # near_duplicates.csv
    paths: list[str]  # manifest path per index row
    images: ShardedImages = field(repr=False)  # uint8 pixels per index row
    seconds: dict[str, float] = field(default_factory=dict)
    neighbours: tuple[np.ndarray, np.ndarray] | None = None  # embeddings: each image's nearest (similarities, rows)

    @property
    def moved(self) -> int:
        return int((self.index["split"] != self.audited["split"]).sum())


def find_near_duplicates(resized_dir: Path, manifest: pd.DataFrame, cache_dir: Path, cfg: AuditConfig, *,
                         arch: str, weights: str, device: str = "auto", amp: str = "auto") -> Audit:
    """Vectors for every resized image (cached per sha1), pairs above the threshold, groups, and the splits."""
    meta, index = read_meta(resized_dir), read_index(resized_dir)
    images = ShardedImages(shard_folder(resized_dir, meta), index["shard"].to_numpy(),
                           index["row"].to_numpy(np.int64), meta["size"])
    path_of = dict(zip(manifest["sha1"], manifest["path"], strict=True))
    paths = [path_of[s] for s in index["sha1"]]
    start = time.perf_counter()
    featurizer = choose_featurizer(arch, weights, meta["classes"], meta["size"], meta.get("recipe", ""), device, amp)
    batch = featurizer.batch if cfg.batch_size == "auto" else cfg.batch_size
    features, computed = update_cache(cache_dir, featurizer, index["sha1"].tolist(), _Batches(images), batch,
                                      desc="embed" if featurizer.kind == "embedding" else "hash")
    seconds = {"features": time.perf_counter() - start}
    start = time.perf_counter()
    neighbours = None
    if featurizer.kind == "embedding":
        neighbours = nearest(features.block, len(features), NEIGHBOURS, exact_max=cfg.exact_search_max)
        pairs = margin_pairs(*neighbours, cfg.duplicate_floor, cfg.duplicate_margin)
    else:
        pairs = hash_pairs(features.block(0, len(features)), cfg.hash_distance)
    groups = connected_groups(len(index), pairs)
    seconds["neighbours"] = time.perf_counter() - start
    audited = keep_groups_together(index, groups) if cfg.group_splits else index.copy()
    table = duplicate_table(groups, index, audited, paths, features)
    return Audit(featurizer.kind, features, computed, pairs, groups, index, audited, table, paths, images, seconds,
                 neighbours)
