"""A dataset that grows or shrinks: only the change is decoded and rewritten, and the result is the from-scratch one."""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from kennel.data import shard_writer, validate
from kennel.data.images import load_array
from kennel.data.manifest import SPLITS, account
from kennel.data.shard_writer import write_splits
from kennel.data.shards import read_index, read_split
from kennel.data.sources import find_images
from kennel.data.validate import file_stats, identity_table, inspect_all, read_scan, scan_table
from tests.conftest import dvc, make_project, small_params, write_image, write_params

SIZE = 32


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(shard_writer, "SHARD_BYTES", 8 * 3 * SIZE * SIZE)  # 8 rows a shard: many shards from few images


def _raw(raw: Path, n: int, start: int = 0) -> Path:
    for i in range(start, start + n):
        label = ("cat", "dog")[i % 2]
        write_image(raw / label / f"{i}.png", i, label, (40 + i % 7, 30 + i % 5))
    return raw


def _manifest(root: Path, min_size: int = 8, max_pixels: int = 10**8, seen=None):
    candidates = find_images("folder", root / "raw")
    inspections = inspect_all(candidates, min_size, max_pixels, seen=seen)
    acc = account(candidates, inspections, root, 0.2, 0.2, 0)
    return acc, scan_table(acc.paths, inspections)


def _resize(root: Path, manifest, size=SIZE, mode="squash", calls=None):
    def load(path, size):
        if calls is not None:
            calls.append(Path(path).name)
        return load_array(path, size, mode=mode)

    return write_splits(manifest, root, size, root / "resized", load, recipe=mode)


def _shard_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in (root / "resized" / "shards").glob("*.npy")}


def _arrays(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {split: tuple(np.array(a) for a in read_split(root / "resized", split)) for split in SPLITS}


def test_adding_images_keeps_every_old_shard_and_decodes_only_the_new(tmp_path):
    _raw(tmp_path / "raw", 40)
    _resize(tmp_path, _manifest(tmp_path)[0].manifest)
    before = _shard_hashes(tmp_path)
    _raw(tmp_path / "raw", 3, start=40)
    calls = []
    done = _resize(tmp_path, _manifest(tmp_path)[0].manifest, calls=calls)
    assert sorted(calls) == ["40.png", "41.png", "42.png"] and done.decoded == 3
    after = _shard_hashes(tmp_path)
    assert before.items() <= after.items()  # same names, same bytes
    assert len(after) == len(before) + 1
    for split, (x, _) in _arrays(tmp_path).items():  # every row is still its image's pixels
        rows = read_index(tmp_path / "resized").query(f"split == '{split}'")
        paths = _manifest(tmp_path)[0].manifest.set_index("sha1").loc[rows["sha1"], "path"]
        for row, path in zip(x, paths, strict=True):
            assert np.array_equal(row, load_array(tmp_path / path, SIZE, mode="squash"))


def test_removing_an_image_removes_it_from_training_and_from_the_shards(tmp_path):
    raw = _raw(tmp_path / "raw", 40)
    _resize(tmp_path, _manifest(tmp_path)[0].manifest)
    index = read_index(tmp_path / "resized")
    gone = index[index["split"] == "train"].iloc[0]
    victim = next(p for p in raw.rglob("*.png") if hashlib.sha1(p.read_bytes()).hexdigest() == gone["sha1"])
    pixels = load_array(victim, SIZE, mode="squash")
    before = _shard_hashes(tmp_path)
    victim.unlink()
    calls = []
    done = _resize(tmp_path, _manifest(tmp_path)[0].manifest, calls=calls)
    assert calls == [] and done.decoded == 0  # the shard is rewritten from its other rows
    x, _ = read_split(tmp_path / "resized", "train")
    assert len(x) == (index["split"] == "train").sum() - 1
    assert not any(np.array_equal(row, pixels) for row in np.array(x))
    stored = b"".join((tmp_path / "resized" / "shards" / n).read_bytes() for n in _shard_hashes(tmp_path))
    assert pixels.tobytes() not in stored
    changed = set(before.items()) - set(_shard_hashes(tmp_path).items())
    assert [name for name, _ in changed] == [f"{gone['shard']}.npy"]  # only the shard that held it


@pytest.mark.parametrize("change", [{"size": SIZE + 8}, {"mode": "center_crop"}])
def test_a_resize_param_change_redoes_every_image(tmp_path, change):
    _raw(tmp_path / "raw", 20)
    manifest = _manifest(tmp_path)[0].manifest
    _resize(tmp_path, manifest)
    old = _shard_hashes(tmp_path)
    calls = []
    _resize(tmp_path, manifest, calls=calls, **change)
    assert len(calls) == len(manifest)
    assert not set(old) & set(_shard_hashes(tmp_path))  # nothing of the old recipe is left
    size, mode = change.get("size", SIZE), change.get("mode", "squash")
    x, _ = read_split(tmp_path / "resized", "train")
    first = read_index(tmp_path / "resized").query("split == 'train'")["sha1"].iloc[0]
    path = manifest.set_index("sha1").loc[first, "path"]
    assert np.array_equal(x[0], load_array(tmp_path / path, size, mode=mode))


def test_prepare_limits_redo_only_the_images_they_change(tmp_path, monkeypatch):
    raw = _raw(tmp_path / "raw", 20)
    for i in range(4):  # small images: too small at min_size 28, kept at 8
        write_image(raw / "cat" / f"small{i}.png", 100 + i, "cat", (24, 24))
    (raw / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    acc, scan = _manifest(tmp_path, min_size=28)
    assert (acc.rejects["reason"] == validate.TOO_SMALL).sum() == 4
    decoded = []
    real = validate.inspect_image
    monkeypatch.setattr(validate, "inspect_image", lambda path, *a: decoded.append(Path(path).name) or real(path, *a))
    scan.to_csv(tmp_path / "scan.csv", index=False)
    seen = read_scan(tmp_path / "scan.csv")

    same, _ = _manifest(tmp_path, min_size=28, seen=seen)
    assert decoded == []
    lower, lower_scan = _manifest(tmp_path, min_size=8, seen=seen)
    assert sorted(decoded) == [f"small{i}.png" for i in range(4)]  # only those the old limit never decoded
    lower_scan.to_csv(tmp_path / "scan.csv", index=False)
    bomb, _ = _manifest(tmp_path, min_size=8, max_pixels=1000, seen=read_scan(tmp_path / "scan.csv"))
    assert len(decoded) == 4  # a pixel limit is judged from the sizes already known
    monkeypatch.undo()
    for got, limits in ((same, (28, 10**8)), (lower, (8, 10**8)), (bomb, (8, 1000))):
        fresh, fresh_scan = _manifest(tmp_path, *limits)
        assert got.manifest.equals(fresh.manifest) and got.rejects.equals(fresh.rejects)
        assert got.summary == fresh.summary
    assert lower_scan.equals(_manifest(tmp_path, 8)[1])


def test_files_known_by_identity_are_not_read_again(tmp_path, monkeypatch):
    raw = _raw(tmp_path / "raw", 12)
    candidates = find_images("folder", raw)
    stats = file_stats([c.path for c in candidates])
    first = inspect_all(candidates, 8, 10**8, stats=stats)
    paths = account(candidates, first, tmp_path, 0.2, 0.2, 0).paths
    scan_table(paths, first).to_csv(tmp_path / "scan.csv", index=False)
    identity_table(stats, first).to_csv(tmp_path / "ids.csv", index=False)
    write_image(raw / "cat" / "0.png", 99, "cat", (44, 33))  # new bytes under an old name: its identity changed
    _raw(raw, 1, start=12)  # a new file
    read = []
    real = validate._sha1_and_head
    monkeypatch.setattr(validate, "_sha1_and_head", lambda path: read.append(Path(path).name) or real(path))

    candidates = find_images("folder", raw)
    stats = file_stats([c.path for c in candidates])
    again = inspect_all(candidates, 8, 10**8, seen=read_scan(tmp_path / "scan.csv", tmp_path / "ids.csv"),
                        stats=stats)
    assert set(read) == {"0.png", "12.png"}  # hashed, then decoded as new bytes; the other 11 not opened
    assert again == inspect_all(candidates, 8, 10**8)  # what a cold run finds
    read.clear()
    without_ids = inspect_all(candidates, 8, 10**8, seen=read_scan(tmp_path / "scan.csv"), stats=stats)
    assert without_ids == again and len(read) == 13 + 2  # no identities: every file hashed, the 2 new decoded



def _second_row(text: str, change) -> str:
    lines = text.splitlines()
    return "\n".join([lines[0], change(lines[1]), *lines[2:]]) + "\n"


@pytest.mark.parametrize("damage", [
    lambda text: "\x00\x01 not a table",
    lambda text: "",
    lambda text: "path,sha1\nraw/cat/1.png,abc\n",  # columns missing
    lambda text: _second_row(text, lambda row: row.replace(",40,", ",wide,")),  # a width that is no number
    lambda text: _second_row(text, lambda row: row.split(",")[0]),  # a short row
], ids=["binary", "empty", "columns", "width", "short"])
def test_a_damaged_scan_means_a_cold_start(tmp_path, damage):
    raw = _raw(tmp_path / "raw", 4)
    candidates = find_images("folder", raw)
    stats = file_stats([c.path for c in candidates])
    first = inspect_all(candidates, 8, 10**8, stats=stats)
    scan_table(account(candidates, first, tmp_path, 0.2, 0.2, 0).paths, first).to_csv(tmp_path / "scan.csv",
                                                                                      index=False)
    identity_table(stats, first).to_csv(tmp_path / "ids.csv", index=False)
    intact = read_scan(tmp_path / "scan.csv", tmp_path / "ids.csv")
    assert len(intact.by_sha1) == 4 and len(intact.by_file) == 4

    (tmp_path / "ids.csv").write_text("file\nno sha1 column\n")  # the identities alone lost: the scan still counts
    assert read_scan(tmp_path / "scan.csv", tmp_path / "ids.csv") == validate.Scan(intact.by_sha1, {})
    damaged = damage((tmp_path / "scan.csv").read_text())
    assert damaged != (tmp_path / "scan.csv").read_text()
    (tmp_path / "scan.csv").write_text(damaged)
    assert read_scan(tmp_path / "scan.csv", tmp_path / "ids.csv") == validate.Scan()


def _stages(root: Path) -> None:
    from stages.prepare import main as prepare
    from stages.resize import main as resize

    assert prepare([]) == 0 and resize([]) == 0


def test_incremental_runs_give_the_from_scratch_result(tmp_path, monkeypatch):
    params = small_params(**{"data.source": "folder", "data.min_per_class": 2, "data.min_size": 24,
                             "resize.size": SIZE, "data.workers": 1, "resize.workers": 1})
    grown, scratch = tmp_path / "grown", tmp_path / "scratch"
    for root in (grown, scratch):
        root.mkdir()
        write_params(root / "params.yaml", params)
    raw = _raw(grown / "data" / "raw", 30)
    (raw / "cat" / "empty.jpg").write_bytes(b"")
    (raw / "dog" / "notes.jpg").write_text("not a picture")
    write_image(raw / "dog" / "tiny.png", 7, "dog", (20, 20))
    shutil.copy(raw / "cat" / "0.png", raw / "dog" / "conflict.png")
    monkeypatch.chdir(grown)
    _stages(grown)
    # The next version: some images added, one removed, one moved to the other class.
    _raw(raw, 6, start=30)
    (raw / "cat" / "2.png").unlink()
    (raw / "dog" / "5.png").rename(raw / "cat" / "5.png")
    _stages(grown)
    shutil.copytree(raw, scratch / "data" / "raw")
    monkeypatch.chdir(scratch)
    _stages(scratch)

    for rel in ("data/prepared/manifest.csv", "reports/rejects.csv", "reports/data_summary.json", "data/scan.csv"):
        assert (grown / rel).read_text() == (scratch / rel).read_text(), rel
    a, b = (read_index(r / "data/resized")[["split", "label", "sha1"]] for r in (grown, scratch))
    assert a.equals(b)
    meta = [json.loads((r / "data/resized/classes.json").read_text()) for r in (grown, scratch)]
    assert meta[0] == meta[1]  # same classes, counts and data fingerprint: a checkpoint resumes on either
    for split in SPLITS:
        (xa, ya), (xb, yb) = (read_split(r / "data/resized", split) for r in (grown, scratch))
        assert np.array_equal(np.array(xa), np.array(xb)) and np.array_equal(ya, yb)
    summary = json.loads((grown / "reports/data_summary.json").read_text())
    assert summary["found"] == summary["kept"] + summary["rejected"] and summary["rejected"] >= 5


def test_unusable_previous_state_is_redone_not_trusted(tmp_path):
    _raw(tmp_path / "raw", 20)
    manifest = _manifest(tmp_path)[0].manifest
    _resize(tmp_path, manifest)
    shard = sorted((tmp_path / "resized" / "shards").glob("*.npy"))[0]
    np.save(shard, np.zeros((1, 3, SIZE, SIZE), np.uint8))  # a shard that does not hold what its name says
    (tmp_path / "resized" / "shards" / ".leftover.npy.tmp").write_bytes(b"half")
    calls = []
    _resize(tmp_path, manifest, calls=calls)
    assert 0 < len(calls) <= 8
    assert not (tmp_path / "resized" / "shards" / ".leftover.npy.tmp").exists()
    x, _ = read_split(tmp_path / "resized", "train")
    expected = partial(load_array, size=SIZE, mode="squash")
    rows = read_index(tmp_path / "resized").query("split == 'train'")["sha1"]
    paths = manifest.set_index("sha1").loc[rows, "path"]
    assert all(np.array_equal(r, expected(tmp_path / p)) for r, p in zip(np.array(x), paths, strict=True))


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_dvc_cache_grows_by_the_new_images_only(tmp_path):
    size = 96
    params = small_params(**{"data.source": "folder", "data.min_per_class": 2, "data.min_size": 24,
                             "resize.size": size})
    root = make_project(tmp_path / "project", params)
    raw = _raw(root / "data" / "raw", 120)
    dvc(["repro", "resize"], root)
    cache, shards = root / ".dvc" / "cache", root / "data" / "resized" / "shards"
    before, files = _bytes(cache), {p.name: p.stat() for p in shards.iterdir()}
    _raw(raw, 6, start=120)
    out = dvc(["repro", "resize"], root).stdout
    assert "Running stage 'prepare'" in out and "Running stage 'resize'" in out
    new_images = 6 * 3 * size * size
    growth = _bytes(cache) - before
    assert new_images <= growth <= 2 * new_images, (growth, new_images)
    for name, stat in files.items():  # neither the stage nor DVC rewrote an old shard
        now = (shards / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert "Running stage" not in dvc(["repro", "resize"], root).stdout
    per_class = json.loads((root / "reports" / "data_summary.json").read_text())["per_class"]
    assert len(read_split(root / "data" / "resized", "train")[0]) == sum(c["train"] for c in per_class.values())
