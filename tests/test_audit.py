"""The audit on tiny data: a planted near-copy is found and kept in one split; the hash fallback without pretrained
weights; the feature cache computes only new images; the audited splits are what train and evaluate read."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from kennel.audit.near_duplicates import find_near_duplicates
from kennel.audit.neighbours import connected_groups, cosine_pairs, margin_pairs, nearest
from kennel.audit.outliers import outlier_scores
from kennel.audit.phash import phash_featurizer
from kennel.audit.splits import keep_groups_together, write_audited
from kennel.core.device import CPU_INFERENCE_BATCH
from kennel.core.params import params_from_dict
from kennel.data.manifest import read_manifest, split_of
from kennel.data.shards import read_index, read_meta, read_split
from kennel.data.synthetic import render
from kennel.data.vectors import open_cache, update_cache
from kennel.evaluate.evaluation import split_paths
from tests.conftest import build_dataset, leaking_copy, small_params

SEED, VAL, TEST = 0, 0.25, 0.25  # build_dataset's


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """12 synthetic drawings per class as a folder of files, and a copy of cat 3 that its hash puts in another
    split than the original."""
    root = tmp_path_factory.mktemp("planted")
    for label in ("cat", "dog"):
        for i in range(12):
            path = root / "raw" / label / f"{label}.{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            render(label, 0, i).save(path)
    original = root / "raw/cat/cat.3.png"
    split = split_of(hashlib.sha1(original.read_bytes()).hexdigest(), SEED, VAL, TEST)
    (root / "raw/cat/copy of cat 3.jpg").write_bytes(leaking_copy(Image.open(original), split, SEED, VAL, TEST))
    build_dataset(root, source="folder", size=64)
    return root


def audit_params(**overrides):
    return params_from_dict(small_params(**{"resize.size": 64, **overrides})).audit


def test_a_planted_copy_is_found_and_kept_in_one_split(planted, tmp_path, caplog):
    manifest = read_manifest(planted / "manifest.csv")
    with caplog.at_level(logging.INFO):
        found = find_near_duplicates(planted / "resized", manifest, tmp_path / "cache", audit_params(),
                                     arch="resnet18", weights="none", device="cpu", amp="off")
    # no pretrained weights: one clear line, and the near-copies still come from the perceptual hash
    assert found.kind == "phash"
    assert any("no pretrained weights" in r.message and "perceptual hash" in r.message
               and "label checks are skipped" in r.message for r in caplog.records)
    table = found.table
    assert set(table["path"]) == {"raw/cat/cat.3.png", "raw/cat/copy of cat 3.jpg"}  # and no false pair
    assert table["group"].nunique() == 1 and table["similarity"].iloc[-1] >= 1 - 24 / 256
    assert table["hash_split"].nunique() == 2  # a leak across splits ...
    assert table["split"].nunique() == 1  # ... that the audited splits close
    anchor = table.sort_values("sha1")["hash_split"].iloc[0]
    assert table["split"].iloc[0] == anchor and found.moved == 1  # the smallest sha1 keeps its split


def test_group_splits_off_leaves_the_hash_splits(planted, tmp_path):
    manifest = read_manifest(planted / "manifest.csv")
    found = find_near_duplicates(planted / "resized", manifest, tmp_path / "cache", audit_params(
        **{"audit.group_splits": False}), arch="resnet18", weights="none", device="cpu", amp="off")
    assert found.moved == 0 and found.table["split"].nunique() == 2  # reported, not moved
    write_audited(tmp_path / "audited", found.audited, planted / "resized", read_meta(planted / "resized"))
    assert (tmp_path / "audited/index.csv").read_bytes() == (planted / "resized/index.csv").read_bytes()


def test_the_audited_splits_are_what_train_and_evaluate_read(planted, tmp_path):
    manifest = read_manifest(planted / "manifest.csv")
    found = find_near_duplicates(planted / "resized", manifest, tmp_path / "cache", audit_params(),
                                 arch="resnet18", weights="none", device="cpu", amp="off")
    out = tmp_path / "data/audited"
    meta = write_audited(out, found.audited, planted / "resized", read_meta(planted / "resized"))
    assert meta["moved"] == 1 and (out / meta["shards"]).resolve() == (planted / "resized/shards").resolve()
    assert meta["fingerprint"] != read_meta(planted / "resized")["fingerprint"]  # checkpoints of other splits
    copy = found.table.set_index("path").loc["raw/cat/copy of cat 3.jpg"]
    moved_to = copy["split"]
    images, labels = read_split(out, moved_to)
    before, _ = read_split(planted / "resized", moved_to)
    assert len(images) == len(before) + 1
    paths = split_paths(planted / "manifest.csv", out, moved_to, meta["classes"], labels)
    assert "raw/cat/copy of cat 3.jpg" in paths
    position = paths.index("raw/cat/copy of cat 3.jpg")
    sha1 = copy["sha1"]
    index = read_index(planted / "resized")
    row = index[index["sha1"] == sha1].iloc[0]
    shard = np.load(planted / "resized/shards" / f"{row['shard']}.npy", mmap_mode="r")[row["row"]]
    assert np.array_equal(np.asarray(images[position]), shard)  # the pixels come from data/resized's shards


def test_the_cache_computes_only_new_images(planted, tmp_path):
    meta, index = read_meta(planted / "resized"), read_index(planted / "resized")
    everything = np.concatenate([np.asarray(read_split(planted / "resized", s)[0]) for s in ("train", "val", "test")])
    sha1s = pd.concat([index[index["split"] == s] for s in ("train", "val", "test")])["sha1"].tolist()
    featurizer = phash_featurizer(meta["size"], meta["recipe"])
    calls = []
    counted = featurizer.__class__(featurizer.kind, featurizer.fingerprint, featurizer.dim, featurizer.dtype,
                                   lambda x: calls.append(len(x)) or featurizer.compute(x))
    first, computed = update_cache(tmp_path, counted, sha1s[:20], everything[:20], batch_size=8)
    assert computed == 20 and sum(calls) == 20
    calls.clear()
    grown, computed = update_cache(tmp_path, counted, sha1s, everything, batch_size=8)
    assert computed == len(sha1s) - 20 and sum(calls) == len(sha1s) - 20  # only the new ones
    assert np.array_equal(grown.block(0, 20), first.block(0, 20))
    assert np.array_equal(grown.block(0, len(sha1s)), featurizer.compute(everything))
    calls.clear()
    shrunk, computed = update_cache(tmp_path, counted, sha1s[20:], everything[20:], batch_size=8)
    assert computed == 0 and len(list((tmp_path / "chunks").iterdir())) == 1  # the first run's chunk is gone
    # what training reads: the stored rows of every sha1 asked for, or nothing when one is missing or made otherwise
    read = open_cache(tmp_path, featurizer.fingerprint, sha1s[20:])
    assert np.array_equal(read.raw(np.arange(len(read))), featurizer.compute(everything[20:]))
    assert open_cache(tmp_path, featurizer.fingerprint, sha1s) is None  # the first 20 left the cache
    assert open_cache(tmp_path, "another fingerprint", sha1s[20:]) is None
    other = featurizer.__class__("phash", "another fingerprint", featurizer.dim, "uint8", featurizer.compute)
    assert update_cache(tmp_path, other, sha1s, everything, batch_size=8)[1] == len(sha1s)


def test_embeddings_rank_the_planted_copy_first_and_are_cached(planted, tmp_path, caplog):
    """With a weights file (taken as pretrained) the pooled features are used; random ones cannot tell drawings
    apart by a threshold, but the mirrored, resized, re-encoded copy is still the most similar pair."""
    torch.manual_seed(0)
    weights = tmp_path / "backbone.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    manifest = read_manifest(planted / "manifest.csv")
    cfg = audit_params(**{"audit.duplicate_floor": 0.5, "audit.duplicate_margin": 0.0})  # every neighbour above 0.5
    found = find_near_duplicates(planted / "resized", manifest, tmp_path / "cache", cfg, arch="resnet18",
                                 weights=str(weights), device="cpu", amp="off")
    assert found.kind == "embedding" and found.computed == len(manifest)
    a, b = found.pairs.iloc[0][["a", "b"]].astype(int)
    assert {found.paths[a], found.paths[b]} == {"raw/cat/cat.3.png", "raw/cat/copy of cat 3.jpg"}
    vectors = found.features.block(0, len(found.features)).astype(np.float32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-2)
    again = find_near_duplicates(planted / "resized", manifest, tmp_path / "cache", cfg, arch="resnet18",
                                 weights=str(weights), device="cpu", amp="off")
    assert again.computed == 0 and again.pairs.equals(found.pairs)
    # the shipped batch (auto: a few images a pass on a CPU, for speed) and a wide one embed alike
    wide = find_near_duplicates(planted / "resized", manifest, tmp_path / "cache64", replace(cfg, batch_size=64),
                                arch="resnet18", weights=str(weights), device="cpu", amp="off")
    assert cfg.batch_size == "auto" and wide.computed == len(manifest) > CPU_INFERENCE_BATCH
    np.testing.assert_allclose(wide.features.block(0, len(manifest)).astype(np.float32), vectors, atol=1e-3)
    assert wide.pairs[["a", "b"]].equals(found.pairs[["a", "b"]])


def test_block_search_equals_the_full_matrix():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[150] = x[7] + 0.01
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = x @ x.T
    expected = {(a, b) for a, b in zip(*np.nonzero(full >= 0.6), strict=True) if a < b}
    pairs = cosine_pairs(lambda start, stop: x[start:stop], len(x), 0.6, size=64)  # 5 blocks
    assert set(zip(pairs["a"], pairs["b"], strict=True)) == expected and (7, 150) in expected
    assert np.allclose(pairs["similarity"], full[pairs["a"], pairs["b"]], atol=1e-5)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_nearest_neighbours_by_blocks_equal_the_full_matrix():
    x = unit(np.random.default_rng(1).normal(size=(150, 8)))
    sims, ids = nearest(lambda start, stop: x[start:stop], len(x), 4, size=64)  # 3 blocks
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    assert np.array_equal(ids, np.argsort(-full, axis=1)[:, :4])
    assert np.allclose(sims, np.take_along_axis(full, ids, axis=1), atol=1e-5)


def test_past_the_exact_size_an_hnsw_graph_finds_the_same_neighbours():
    x = unit(np.random.default_rng(2).normal(size=(300, 16)))
    exact = nearest(lambda start, stop: x[start:stop], len(x), 5, size=128)
    graph = nearest(lambda start, stop: x[start:stop], len(x), 5, size=128, exact_max=100)
    assert (graph[1] != np.arange(300)[:, None]).all()  # never an image itself
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact[1], graph[1], strict=True)])
    assert recall > 0.95 and np.allclose(graph[0][:, 0], exact[0][:, 0], atol=1e-4)


def test_the_margin_rule_finds_a_copy_a_fixed_threshold_misses_and_ignores_a_dense_crowd():
    """A cropped copy at cosine 0.90 stands out from the photos around it (<= ~0.6); a crowd of distinct but
    alike images (sea tiles, all above 0.91 to each other) does not stand out from itself."""
    rng = np.random.default_rng(0)
    photos = unit(rng.normal(size=(40, 64)))
    copy = unit(photos[3] + 0.55 * unit(rng.normal(size=64)))
    crowd = unit(unit(rng.normal(size=64)) + 0.25 * unit(rng.normal(size=(12, 64))))
    x = np.concatenate([photos, copy[None], crowd])
    crowd_sims = (x[41:] @ x[41:].T)[np.triu_indices(12, 1)]
    assert 0.8 < float(x[3] @ x[40]) < 0.91 < crowd_sims.min()
    fixed = cosine_pairs(lambda start, stop: x[start:stop], len(x), 0.91)
    assert len(fixed) == 66 and (3, 40) not in set(zip(fixed["a"], fixed["b"], strict=True))  # the old rule
    pairs = margin_pairs(*nearest(lambda start, stop: x[start:stop], len(x), 10), floor=0.8, margin=0.06)
    assert list(zip(pairs["a"], pairs["b"], strict=True)) == [(3, 40)]
    assert pairs["similarity"].iloc[0] == pytest.approx(float(x[3] @ x[40]), abs=1e-5)


def test_an_image_of_another_kind_ranks_first_among_the_outliers():
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(2, 32)))
    labels = np.repeat([0, 1], 20)
    x = centres[labels] + 0.08 * rng.normal(size=(40, 32))
    x[17] = unit(rng.normal(size=32))  # a scan filed among the cats
    ranked = outlier_scores(x, labels, ["cat", "dog"])
    assert ranked["index"].iloc[0] == 17 and ranked["rank"].tolist() == list(range(1, 41))
    assert ranked["score"].iloc[0] > 2 * ranked["score"].iloc[1]
    assert ranked["score"].median() == pytest.approx(1, abs=0.1)  # a typical member scores 1


def test_groups_chain_and_follow_the_smallest_sha1():
    pairs = pd.DataFrame({"a": [0, 1, 4], "b": [1, 2, 5], "similarity": [0.99, 0.95, 0.97]})
    groups = connected_groups(7, pairs)
    assert groups.tolist() == [1, 1, 1, 0, 2, 2, 0]
    index = pd.DataFrame({"split": ["train", "test", "val", "test", "val", "train", "test"],
                          "sha1": ["c", "a", "b", "d", "f", "e", "g"]})
    moved = keep_groups_together(index, groups)
    assert moved["split"].tolist() == ["test", "test", "test", "test", "train", "train", "test"]


@pytest.mark.parametrize("pretrained", [False, True], ids=["no-weights", "weights-file"])
def test_the_stage_writes_the_label_check_or_says_why_not(tmp_path, monkeypatch, caplog, pretrained):
    """The audit stage end to end in a project folder: near-copies and the label check's CSV, grid and count."""
    import json

    from stages.audit import main as audit
    from stages.prepare import main as prepare
    from stages.resize import main as resize

    from tests.conftest import write_params

    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    overrides = {}
    if pretrained:
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "backbone.pt")
        overrides["model.weights"] = "backbone.pt"
    write_params(tmp_path / "params.yaml", small_params(**overrides))
    caplog.set_level(logging.INFO)
    assert prepare([]) == 0 and resize([]) == 0 and audit([]) == 0
    table = pd.read_csv(tmp_path / "reports/audit/label_issues.csv")
    assert list(table.columns) == ["rank", "path", "sha1", "given_label", "suggested_label", "score", "flagged",
                                   "split"]
    outliers = pd.read_csv(tmp_path / "reports/audit/outliers.csv")
    assert list(outliers.columns) == ["rank", "path", "sha1", "label", "nearest_class", "score", "split"]
    for png in ("label_issues.png", "outliers.png"):
        assert (tmp_path / "reports/audit" / png).stat().st_size > 0
    metrics = json.loads((tmp_path / "reports/audit/metrics.json").read_text())
    assert metrics["audit_label_issues"] == table["flagged"].sum()
    assert metrics["audit_outliers"] == (outliers["score"] >= small_params()["audit"]["outlier_score"]).sum()
    assert len(table) == len(outliers) == (metrics["audit_images"] if pretrained else 0)
    skipped = any("label checks skipped" in r.getMessage() for r in caplog.records)
    assert skipped != pretrained and (pretrained or table.empty)
    if pretrained:
        assert any("suspected label error(s) of" in r.getMessage() for r in caplog.records)
        assert set(table["given_label"]) <= {"cat", "dog"} and set(table["split"]) <= {"train", "val", "test"}
        frozen_phases_read_the_audits_features(tmp_path, overrides, caplog)
    else:
        assert "features" not in read_meta(tmp_path / "data/audited")  # hashes: nothing for training to read


def frozen_phases_read_the_audits_features(root: Path, overrides: dict, caplog) -> None:
    """The pooled features the audit cached are the ones a pass through the backbone gives, split by split, and
    a head-only run reads them instead of computing them; another precision is another cache."""
    from kennel.core.device import resolve_amp
    from kennel.model.features import features_key
    from kennel.train.batches import make_batches
    from kennel.train.fine_tune import build_for, extract_features, split_features, train

    params = params_from_dict(small_params(**overrides, **{"model.finetune": "head", "train.epochs": 1}))
    audited, device = root / "data/audited", torch.device("cpu")
    assert read_meta(audited)["features"] == "../embeddings"
    amp = resolve_amp(params.train.amp, device)
    key = features_key(params, audited, amp)
    model, *_ = build_for(params, audited, device, amp)
    how = dict(resident=True, batch_size=8, num_workers=0)
    for split in ("train", "val", "test"):
        cached, labels, hit = split_features(model, audited, split, how, device, amp, key)
        computed, computed_labels = extract_features(model, make_batches(audited, split, **how, device=device),
                                                     device, amp)
        assert hit and torch.equal(labels, computed_labels), split
        assert torch.allclose(cached, computed, rtol=1e-4, atol=1e-5), (split, (cached - computed).abs().max())
    other = features_key(params, audited, torch.float16 if amp is None else None)
    assert not split_features(model, audited, "val", how, device, amp, other)[2]  # computed: another cache
    caplog.clear()
    result = train(params, audited)
    assert any(r.getMessage().endswith("read from the audit's cache") for r in caplog.records), caplog.text
    evaluation_reads_them(root, params, result.model, caplog)


def evaluation_reads_them(root: Path, params, model, caplog) -> None:
    """Evaluating the head-only model scores the test split from the same cache, with the logits a pass through
    the model gives (plain and with flip TTA, which reads the mirrors' half); a backbone that moved is computed."""
    from kennel.evaluate.evaluation import evaluate_model
    from kennel.model.file import save_model

    for tta in ("none", "flip"):
        model.tta = tta
        save_model(model, root / "head.pt", size=params.resize.size, arch=params.model.arch, mode=params.resize.mode)
        how = dict(device="cpu", amp=params.train.amp)
        caplog.clear()
        cached = evaluate_model(root / "head.pt", root / "data/audited", root / "data/prepared/manifest.csv", **how,
                                params=params)
        assert any("the head on the audit's features" in r.getMessage() for r in caplog.records), caplog.text
        computed = evaluate_model(root / "head.pt", root / "data/audited", root / "data/prepared/manifest.csv", **how)
        assert np.array_equal(cached.labels, computed.labels) and cached.paths == computed.paths
        assert np.allclose(cached.probs, computed.probs, rtol=0, atol=1e-6), np.abs(cached.probs - computed.probs).max()
        assert cached.metrics == computed.metrics, tta
    with torch.no_grad():
        next(model.backbone.parameters()).add_(1e-3)
    save_model(model, root / "head.pt", size=params.resize.size, arch=params.model.arch, mode=params.resize.mode)
    caplog.clear()
    evaluate_model(root / "head.pt", root / "data/audited", root / "data/prepared/manifest.csv", device="cpu",
                   amp=params.train.amp, params=params)
    assert not any("the head on the audit's features" in r.getMessage() for r in caplog.records), caplog.text
