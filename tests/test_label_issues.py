"""Suspected label errors from embeddings: a planted flip ranks first, the ranking is repeatable, tiny classes are
handled, and the CSV lists the flagged images most suspect first."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pandas.testing as pdt

from kennel.audit.label_figures import captions, label_issues_png
from kennel.audit.labels import COLUMNS, CSV_COLUMNS, label_issues, write_label_issues
from tests.conftest import write_image

CLASSES = ["cat", "dog", "fox"]


def blobs(per_class: int = 30, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around orthogonal centres, one per class: what a good backbone's embeddings look like."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    centres = np.eye(dim)[: len(CLASSES)] * 4
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def test_a_planted_flip_ranks_first():
    x, labels = blobs()
    noisy = labels.copy()
    noisy[7] = 2  # a cat labelled fox
    issues = label_issues(x, noisy, CLASSES, seed=0)
    assert list(issues.columns) == COLUMNS and len(issues) == len(labels)
    first = issues.iloc[0]
    assert (first["index"], first["given_label"], first["suggested_label"], first["rank"]) == (7, "fox", "cat", 1)
    assert first["is_issue"] and first["score"] < 0.1
    assert issues["rank"].tolist() == list(range(1, len(labels) + 1))
    assert sorted(issues["index"]) == list(range(len(labels)))
    assert issues["is_issue"].sum() <= 3  # the clean clusters are not flagged wholesale


def test_the_ranking_is_repeatable_and_follows_the_seed():
    x, labels = blobs(seed=1)
    labels[[3, 40]] = [1, 0]
    one = label_issues(x, labels, CLASSES, seed=5)
    pdt.assert_frame_equal(one, label_issues(x, labels, CLASSES, seed=5))
    assert set(one["index"].head(2)) == {3, 40}


def test_small_classes_use_fewer_folds_and_a_single_image_is_not_judged(caplog):
    x, labels = blobs(per_class=12)
    keep = np.r_[0:12, 12:24, 24:27]  # fox keeps 3 images: 3 folds
    with caplog.at_level(logging.INFO, logger="kennel.audit.labels"):
        issues = label_issues(x[keep], labels[keep], CLASSES, folds=5, seed=0)
    assert "3 folds instead of 5: class 'fox' has 3 images" in caplog.text
    assert issues["score"].notna().all()

    keep = np.r_[0:12, 12:24, 24]  # one fox
    with caplog.at_level(logging.INFO, logger="kennel.audit.labels"):
        issues = label_issues(x[keep], labels[keep], CLASSES, seed=0)
    assert "class(es) fox have a single image and are not judged" in caplog.text
    last = issues.iloc[-1]
    assert (last["index"], last["suggested_label"], last["is_issue"]) == (24, "fox", False)
    assert np.isnan(last["score"]) and issues["score"].iloc[:-1].notna().all()


def test_one_class_judges_nothing(caplog):
    x, labels = blobs(per_class=5)
    issues = label_issues(x[:5], labels[:5], CLASSES, seed=0)
    assert issues["score"].isna().all() and not issues["is_issue"].any()
    assert "need 2 to judge any label" in caplog.text


def test_the_csv_ranks_every_image_flagged_first(tmp_path):
    x, labels = blobs()
    noisy = labels.copy()
    noisy[[5, 50]] = [1, 2]
    issues = label_issues(x, noisy, CLASSES, seed=0)
    images = pd.DataFrame({"path": [f"data/raw/{CLASSES[y]}/{i}.jpg" for i, y in enumerate(labels)],
                           "sha1": [f"{i:040x}" for i in range(len(labels))],
                           "split": ["test" if i == 50 else "train" for i in range(len(labels))]})
    table = write_label_issues(issues, images, tmp_path / "label_issues.csv")
    written = pd.read_csv(tmp_path / "label_issues.csv", dtype={"sha1": str})
    assert list(written.columns) == CSV_COLUMNS and len(written) == len(labels) == len(table)
    assert set(written["path"].head(2)) == {"data/raw/cat/5.jpg", "data/raw/dog/50.jpg"}
    assert written["rank"].tolist() == list(range(1, len(labels) + 1))
    flagged = written["flagged"].to_numpy()
    assert flagged.sum() == issues["is_issue"].sum() and not flagged[flagged.sum():].any()  # flagged ones first
    row = written.set_index("path").loc["data/raw/dog/50.jpg"]
    assert (row["sha1"], row["given_label"], row["suggested_label"], row["split"]) == (f"{50:040x}", "fox", "dog",
                                                                                    "test")
    assert all(part["score"].is_monotonic_increasing for _, part in written.groupby("flagged"))
    top = write_label_issues(issues, images, tmp_path / "top.csv", top=1)
    assert len(top) == 1 and top["path"].iloc[0] == written["path"].iloc[0]


def test_the_grid_shows_the_top_suspects_with_both_labels(tmp_path):
    write_image(tmp_path / "data/raw/cat/1.jpg", 1, "cat")
    table = pd.DataFrame({"path": ["data/raw/cat/1.jpg", "data/raw/dog/gone.jpg"], "sha1": ["a" * 40, "b" * 40],
                          "given_label": ["cat", "dog"], "suggested_label": ["dog", "cat"], "score": [0.031, 0.2],
                          "split": ["test", "train"]}, columns=CSV_COLUMNS)
    assert captions(table)[0] == "cat \u2192 dog  (0.03)\ntest  1.jpg"
    png = label_issues_png(table, tmp_path / "grid.png", root=tmp_path)  # a missing file draws "no image"
    assert png.stat().st_size > 1000
    drawn = label_issues_png(table.head(1), tmp_path / "rows.png", images=[np.zeros((3, 8, 8), np.uint8)])
    assert drawn.exists()
    assert label_issues_png(table.head(0), tmp_path / "none.png").exists()


def test_an_image_cleanlab_does_not_flag_is_still_ranked(tmp_path):
    """A flip cleanlab misses (its label is only doubtful) still has a place in the CSV, above the clean images."""
    x, labels = blobs()
    noisy = labels.copy()
    noisy[7] = 1  # a cat labelled dog, its features moved half way to the dogs: doubtful, not contradicted
    x[7] = (x[7] + x[labels == 1].mean(axis=0)) / 2
    issues = label_issues(x, noisy, CLASSES, seed=0)
    row = issues.set_index("index").loc[7]
    images = pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(labels))], "sha1": "", "split": "train"})
    table = write_label_issues(issues, images, tmp_path / "label_issues.csv")
    assert len(table) == len(labels) and "7.jpg" in set(table["path"])
    mine = table.set_index("path").loc["7.jpg"]
    assert not row["is_issue"] and not mine["flagged"]  # cleanlab does not flag it ...
    assert mine["rank"] == row["rank"] == 1 and mine["suggested_label"] == "cat"  # ... and still it comes first
