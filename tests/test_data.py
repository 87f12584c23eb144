import pickle
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from benchmarks.plain_arrays import read_plain, write_split
from PIL import Image

from kennel.core.errors import DataError
from kennel.data.dataset import ImageArrayDataset
from kennel.data.images import load_array
from kennel.data.manifest import (
    Accounting,
    account,
    assign_splits,
    check_class_sizes,
    read_manifest,
    split_of,
    write_csv,
)
from kennel.data.shard_writer import write_splits
from kennel.data.shards import read_classes, read_split
from kennel.data.sources import find_images
from kennel.data.synthetic import render, write_synthetic
from kennel.data.validate import inspect_all

SQUASH = partial(load_array, mode="squash")  # the resize stage's load function, with the mode the tests use


def test_synthetic_is_deterministic_and_seeded():
    a, b = np.asarray(render("cat", 3, 5)), np.asarray(render("cat", 3, 5))
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(render("cat", 4, 5)))
    assert not np.array_equal(a, np.asarray(render("dog", 3, 5)))
    with pytest.raises(ValueError, match="unknown synthetic class 'cow'"):
        render("cow", 0, 0)


def test_synthetic_images_vary_within_a_class():
    means = [np.asarray(render("dog", 0, i)).mean(axis=(0, 1)) for i in range(8)]
    assert np.std(means, axis=0).min() > 5  # colours differ between scenes, not one template


def test_write_synthetic_files(tmp_path):
    entries = write_synthetic(tmp_path, per_class=3, seed=0)
    assert sorted(label for _, label in entries) == ["cat"] * 3 + ["dog"] * 3
    assert all(p.is_file() and p.parent.name == label for p, label in entries)


def _tree(root, counts: dict[str, int], size=(40, 30)):
    for label, n in counts.items():
        (root / label / "nested").mkdir(parents=True)
        for i in range(n):
            sub = root / label / ("nested" if i % 2 else "")
            Image.new("RGB", size, (i * 5 % 256, ord(label[0]), 50)).save(sub / f"{label}{i}.png")
    return root


def _accounting(tmp_path, counts=None, seed=0):
    raw = _tree(tmp_path / "raw", counts or {"a": 20, "b": 10})
    candidates = find_images("folder", raw)
    return account(candidates, inspect_all(candidates, 8, 10**8), tmp_path, 0.2, 0.1, seed)


def test_splits_are_deterministic_relative_and_seeded(tmp_path):
    acc = _accounting(tmp_path)
    df = acc.manifest
    assert len(df) == 30 and set(df["split"]) <= {"train", "val", "test"}
    assert not df["path"].str.startswith("/").any()
    shuffled = df.sample(frac=1, random_state=1).assign(split="")
    again = assign_splits(shuffled, 0.2, 0.1, seed=0)
    assert again.set_index("path")["split"].to_dict() == df.set_index("path")["split"].to_dict()
    other_seed = assign_splits(df, 0.2, 0.1, seed=1)
    assert other_seed.set_index("path")["split"].to_dict() != df.set_index("path")["split"].to_dict()


def test_split_rates_follow_the_fractions_in_every_class():
    shas = [f"{i:040x}" for i in range(20000)]
    for label_shas in (shas[:10000], shas[10000:]):  # two "classes"
        splits = pd.Series([split_of(s, 3, 0.2, 0.1) for s in label_shas]).value_counts(normalize=True)
        assert splits["test"] == pytest.approx(0.1, abs=0.01)
        assert splits["val"] == pytest.approx(0.2, abs=0.01)


def test_no_training_images_is_an_error():
    sha = next(s for s in (f"{i:040x}" for i in range(100)) if split_of(s, 0, 0.5, 0.4) != "train")
    df = assign_splits(pd.DataFrame({"path": ["x", "y"], "label": ["a", "b"], "sha1": [sha, sha]}), 0.5, 0.4, 0)
    with pytest.raises(DataError, match="no image fell into the train split"):
        check_class_sizes(Accounting(df, pd.DataFrame(columns=["label"]), {}, []), ["a", "b"], 1)


def test_manifest_roundtrip_and_validation(tmp_path):
    df = _accounting(tmp_path).manifest
    write_csv(df, tmp_path / "m.csv")
    back = read_manifest(tmp_path / "m.csv")
    assert back["path"].tolist() == df["path"].tolist() and back["split"].tolist() == df["split"].tolist()
    df.drop(columns="sha1").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="bad.csv: manifest lacks column"):
        read_manifest(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="run the prepare stage"):
        read_manifest(tmp_path / "none.csv")


def test_tensors_roundtrip_and_dataset(tmp_path):
    df = _accounting(tmp_path).manifest
    counts = write_splits(df, tmp_path, 24, tmp_path / "out", SQUASH, workers=2).counts
    assert counts == df["split"].value_counts().reindex(["train", "val", "test"], fill_value=0).to_dict()
    assert read_classes(tmp_path / "out") == ["a", "b"]
    x, y = read_split(tmp_path / "out", "train")
    assert x.shape == (counts["train"], 3, 24, 24) and x.dtype == np.uint8 and x.nbytes == counts["train"] * 3 * 24 * 24
    assert np.array_equal(np.array(x)[-1], x[-1]) and np.array_equal(x[2:5], np.array(x)[2:5])
    train_rows = df[df["split"] == "train"]
    for i in (0, len(train_rows) - 1):
        assert np.array_equal(x[i], load_array(tmp_path / train_rows.iloc[i]["path"], 24, mode="squash"))
        assert y[i] == ["a", "b"].index(train_rows.iloc[i]["label"])

    ds = ImageArrayDataset(tmp_path / "out", "train")
    image, label = ds[0]
    assert len(ds) == counts["train"] and image.dtype == torch.uint8 and image.shape == (3, 24, 24)
    assert label in (0, 1)
    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    assert torch.equal(clone[3][0], ds[3][0])
    assert len(pickle.dumps(ds)) < 1000  # the memory map is reopened, not copied


def test_parallel_and_serial_resize_write_identical_files(tmp_path):
    df = _accounting(tmp_path, {"a": 40, "b": 40}).manifest
    write_splits(df, tmp_path, 32, tmp_path / "one", SQUASH, workers=1)
    write_splits(df, tmp_path, 32, tmp_path / "two", SQUASH, workers=2)
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.*"))
    assert one == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.*"))
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_write_split_leaves_nothing_half_written(tmp_path):
    def broken(path, size):
        raise OSError("truncated")

    with pytest.raises(RuntimeError, match="a.jpg: OSError: truncated"):
        write_split(tmp_path, "train", ["a.jpg"], [0], 8, broken)
    assert list(tmp_path.iterdir()) == []


def test_plain_split_arrays_read_the_same(tmp_path):
    df = _accounting(tmp_path).manifest
    write_splits(df, tmp_path, 24, tmp_path / "shards", SQUASH)
    train = df[df["split"] == "train"]
    write_split(tmp_path / "plain", "train", [tmp_path / p for p in train["path"]], [0] * len(train), 24, SQUASH)
    assert np.array_equal(np.array(read_split(tmp_path / "shards", "train")[0]),
                          np.array(read_plain(tmp_path / "plain", "train")[0]))


def test_read_split_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="classes.json: missing; run the resize stage first"):
        read_split(tmp_path, "test")
