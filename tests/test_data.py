import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from kennel.data.dataset import ImageArrayDataset
from kennel.data.images import load_array
from kennel.data.manifest import assign_splits, build_manifest, read_manifest, write_manifest
from kennel.data.sources import DataError, find_images
from kennel.data.synthetic import render, write_synthetic
from kennel.data.tensors import read_classes, read_split, write_split, write_splits


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
            Image.new("RGB", size, (i * 20 % 255, 100, 50)).save(sub / f"{label}{i}.png")
    return root


def test_folder_source_labels_by_first_level(tmp_path):
    raw = _tree(tmp_path / "raw", {"husky": 3, "tabby": 4})
    (raw / "tabby" / "notes.txt").write_text("not an image")
    entries = find_images("folder", raw)
    labels = {}
    for path, label in entries:
        labels.setdefault(label, []).append(path)
    assert {k: len(v) for k, v in labels.items()} == {"husky": 3, "tabby": 4}
    assert all(p.parts[-2] in (label, "nested") for label, ps in labels.items() for p in ps)


def test_folder_source_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="missing.*folder not found"):
        find_images("folder", tmp_path / "missing")
    raw = _tree(tmp_path / "raw", {"only": 2})
    with pytest.raises(DataError, match="need at least 2"):
        find_images("folder", raw)
    (raw / "empty").mkdir()
    with pytest.raises(DataError, match="class 'empty' has no images"):
        find_images("folder", raw)
    with pytest.raises(DataError, match="data.source = 'ftp'"):
        find_images("ftp", raw)


def _manifest(tmp_path, n_per_class=20, seed=0):
    raw = _tree(tmp_path / "raw", {"a": n_per_class, "b": n_per_class // 2})
    return build_manifest(find_images("folder", raw), tmp_path, 0.2, 0.1, seed)


def test_splits_are_stratified_deterministic_and_relative(tmp_path):
    df = _manifest(tmp_path)
    counts = df.groupby(["label", "split"]).size().to_dict()
    assert counts == {("a", "test"): 2, ("a", "train"): 14, ("a", "val"): 4,
                      ("b", "test"): 1, ("b", "train"): 7, ("b", "val"): 2}
    assert not df["path"].str.startswith("/").any()
    shuffled = df.sample(frac=1, random_state=1).assign(split="")
    again = assign_splits(shuffled, 0.2, 0.1, seed=0)
    assert again.set_index("path")["split"].to_dict() == df.set_index("path")["split"].to_dict()
    other_seed = assign_splits(df, 0.2, 0.1, seed=1)
    assert other_seed.set_index("path")["split"].to_dict() != df.set_index("path")["split"].to_dict()


def test_too_few_images_for_splits_is_an_error(tmp_path):
    df = pd.DataFrame({"path": ["x", "y"], "label": ["a", "a"], "split": "", "sha1": ["1", "2"]})
    with pytest.raises(DataError, match="class 'a' has 2 images"):
        assign_splits(df, 0.5, 0.49, seed=0)


def test_manifest_roundtrip_and_validation(tmp_path):
    df = _manifest(tmp_path)
    write_manifest(df, tmp_path / "m.csv")
    assert read_manifest(tmp_path / "m.csv").equals(df)
    df.drop(columns="sha1").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="bad.csv: manifest lacks column"):
        read_manifest(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="run the prepare stage"):
        read_manifest(tmp_path / "none.csv")


def test_load_array_shapes_and_modes(tmp_path):
    rgba = Image.new("RGBA", (50, 40), (255, 0, 0, 0))  # fully transparent red
    rgba.save(tmp_path / "t.png")
    arr = load_array(tmp_path / "t.png", 32)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.uint8
    assert (arr == 255).all()  # composited on the white background, not red
    Image.new("L", (64, 64), 77).save(tmp_path / "g.jpg")
    assert load_array(tmp_path / "g.jpg", 16).shape == (3, 16, 16)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 cw on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    arr = load_array(tmp_path / "r.jpg", 32)
    # after rotation the white half is the top half
    assert arr[:, :12].mean() > 200 and arr[:, 20:].mean() < 50


def test_tensors_roundtrip_and_dataset(tmp_path):
    df = _manifest(tmp_path)
    counts = write_splits(df, tmp_path, 24, tmp_path / "out", load_array)
    assert counts == {"train": 21, "val": 6, "test": 3}
    assert read_classes(tmp_path / "out") == ["a", "b"]
    x, y = read_split(tmp_path / "out", "train")
    assert x.shape == (21, 3, 24, 24) and x.dtype == np.uint8 and isinstance(x, np.memmap)
    first = df[df["split"] == "train"].iloc[0]
    assert np.array_equal(x[0], load_array(tmp_path / first["path"], 24))

    ds = ImageArrayDataset(tmp_path / "out", "val")
    image, label = ds[0]
    assert len(ds) == 6 and image.dtype == torch.uint8 and image.shape == (3, 24, 24) and label in (0, 1)
    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    assert torch.equal(clone[5][0], ds[5][0])
    assert len(pickle.dumps(ds)) < 1000  # the memory map is reopened, not copied


def test_write_split_leaves_nothing_half_written(tmp_path):
    def broken(path, size):
        raise OSError(f"{path}: truncated")

    with pytest.raises(OSError):
        write_split(tmp_path, "train", ["a.jpg"], [0], 8, broken)
    assert not (tmp_path / "train_x.npy").exists()


def test_read_split_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_x.npy: missing"):
        read_split(tmp_path, "test")
