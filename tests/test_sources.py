"""Every source layout, every broken-file kind, duplicates, conflicts, and splits that stay put."""

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kennel.core.errors import DataError
from kennel.data.manifest import account, check_class_sizes
from kennel.data.sources import extract_zip, find_images, relatives
from kennel.data.validate import BOMB, CORRUPT, DUPLICATE, EMPTY, LABEL_CONFLICT, NOT_IMAGE, TOO_SMALL, inspect_all

MAX_PIXELS = 89_478_485


def _jpeg(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, and no pixel data: a decompression bomb shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _run(tmp_path, source, raw, **kw):
    candidates = find_images(source, raw, out_dir=tmp_path / "prepared", **kw)
    acc = account(candidates, inspect_all(candidates, 32, MAX_PIXELS, workers=2), tmp_path, 0.2, 0.2, seed=0)
    return candidates, acc


def _reasons(acc) -> dict[str, str]:
    return dict(zip(acc.rejects["path"].map(lambda p: p.split("/")[-1]), acc.rejects["reason"], strict=True))


def test_every_bad_file_kind_is_rejected_with_its_reason(tmp_path):
    raw = tmp_path / "raw"
    good = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    truncated = _jpeg(2)
    files = {
        # rejected
        "cat/empty.jpg": b"",
        "cat/truncated.jpg": truncated[: len(truncated) // 2],
        "cat/page.jpg": b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
        "cat/notes.jpg": b"just some text, not a picture\n",
        "cat/Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(500),
        "cat/.DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(100),
        "cat/bomb.png": _png_header_only(100_000, 100_000),
        "cat/tiny.jpg": _encoded(Image.new("RGB", (20, 200), "red"), "JPEG"),
        # kept: other formats named .jpg (decoded by content) and every colour mode
        "cat/really_png.jpg": _encoded(good, "PNG"),
        "cat/really_gif.jpg": _encoded(good.convert("P"), "GIF"),
        "cat/really_bmp.jpg": _encoded(good, "BMP"),
        "cat/really_webp.jpg": _encoded(good, "WEBP"),
        "dog/cmyk.jpg": _encoded(good.convert("CMYK"), "JPEG"),
        "dog/gray.jpg": _encoded(good.convert("L"), "JPEG"),
        "dog/la.png": _encoded(good.convert("LA"), "PNG"),
        "dog/rgba.png": _encoded(good.convert("RGBA"), "PNG"),
        "dog/deep.png": _encoded(Image.fromarray(np.full((40, 40), 40000, np.uint16)), "PNG"),
        "dog/plain.jpg": _jpeg(3),
    }
    pal = good.convert("P")
    pal.info["transparency"] = 0
    files["dog/pal.png"] = _encoded(pal, "PNG", transparency=0)
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    files["dog/anim.gif"] = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    for rel, data in files.items():
        _write(raw / rel, data)

    candidates, acc = _run(tmp_path, "folder", raw)
    assert acc.summary["found"] == len(files) == acc.summary["kept"] + acc.summary["rejected"]
    assert _reasons(acc) == {
        "empty.jpg": EMPTY, "truncated.jpg": CORRUPT, "page.jpg": NOT_IMAGE, "notes.jpg": NOT_IMAGE,
        "Thumbs.db": NOT_IMAGE, ".DS_Store": NOT_IMAGE, "bomb.png": BOMB, "tiny.jpg": TOO_SMALL,
    }
    kept = dict(zip(acc.manifest["path"].map(lambda p: p.split("/")[-1]), acc.manifest["format"], strict=True))
    assert kept["really_png.jpg"] == "PNG" and kept["really_gif.jpg"] == "GIF"
    assert kept["really_bmp.jpg"] == "BMP" and kept["really_webp.jpg"] == "WEBP"
    assert {"cmyk.jpg", "gray.jpg", "la.png", "rgba.png", "deep.png", "pal.png", "anim.gif"} <= set(kept)
    assert acc.summary["rejected_by_reason"] == {EMPTY: 1, CORRUPT: 1, NOT_IMAGE: 4, BOMB: 1, TOO_SMALL: 1}
    assert acc.summary["per_class"]["cat"]["rejected"] == 8 and acc.summary["per_class"]["dog"]["rejected"] == 0
    detail = acc.rejects.set_index("reason").loc[BOMB, "detail"]
    assert "100000x100000" in detail


def test_bomb_is_rejected_without_allocating(tmp_path):
    # 10^10 RGB pixels would need 30 GB: decoding it would fail with MemoryError or kill the process
    _write(tmp_path / "raw/a/bomb.png", _png_header_only(100_000, 100_000))
    _write(tmp_path / "raw/b/ok.jpg", _jpeg(0))
    _, acc = _run(tmp_path, "folder", tmp_path / "raw")
    assert _reasons(acc) == {"bomb.png": BOMB}


def test_duplicates_kept_once_and_label_conflicts_rejected(tmp_path):
    raw = tmp_path / "raw"
    same, shared = _jpeg(10), _jpeg(11)
    for rel, data in {"cat/a.jpg": same, "cat/sub/a_copy.jpg": same, "cat/b.jpg": _jpeg(12),
                      "cat/shared.jpg": shared, "dog/shared_too.jpg": shared, "dog/c.jpg": _jpeg(13)}.items():
        _write(raw / rel, data)
    _, acc = _run(tmp_path, "folder", raw)
    assert _reasons(acc) == {"a_copy.jpg": DUPLICATE, "shared.jpg": LABEL_CONFLICT,
                             "shared_too.jpg": LABEL_CONFLICT}
    assert "same bytes as raw/cat/a.jpg" in acc.rejects.set_index("reason").loc[DUPLICATE, "detail"]
    assert sorted(acc.manifest["path"]) == ["raw/cat/a.jpg", "raw/cat/b.jpg", "raw/dog/c.jpg"]


def test_class_with_too_few_kept_images_is_named(tmp_path):
    raw = tmp_path / "raw"
    for i in range(5):
        _write(raw / f"cat/{i}.jpg", _jpeg(i))
    _write(raw / "dog/broken.jpg", b"")
    _write(raw / "dog/ok.jpg", _jpeg(99))
    candidates, acc = _run(tmp_path, "folder", raw)
    labels = [c.label for c in candidates if c.label]
    with pytest.raises(DataError, match=r"class 'dog' kept 1 image\(s\) \(1 rejected"):
        check_class_sizes(acc, labels, min_per_class=2)
    (raw / "dog/ok.jpg").write_bytes(b"")
    _, acc = _run(tmp_path, "folder", raw)
    with pytest.raises(DataError, match="class 'dog' kept 0 image"):
        check_class_sizes(acc, labels, min_per_class=1)


def test_folder_layout_nested_and_stray_files(tmp_path):
    raw = tmp_path / "raw"
    _write(raw / "husky/a.jpg", _jpeg(1))
    _write(raw / "husky/deep/er/b.jpg", _jpeg(2))
    _write(raw / "tabby/c.jpg", _jpeg(3))
    _write(raw / "README.txt", b"stray")
    candidates, acc = _run(tmp_path, "folder", raw)
    assert {c.path.name: c.label for c in candidates} == {"a.jpg": "husky", "b.jpg": "husky", "c.jpg": "tabby",
                                                          "README.txt": None}
    assert _reasons(acc) == {"README.txt": "not in a class folder"}


def _kaggle_files():
    return {"cat.0.jpg": _jpeg(1), "cat.1.jpg": _jpeg(2), "dog.0.jpg": _jpeg(3), "dog.12.jpg": _jpeg(4),
            "Thumbs.db": b"\xd0\xcf\x11\xe0" + bytes(64)}


def test_kaggle_flat_layout(tmp_path):
    for name, data in _kaggle_files().items():
        _write(tmp_path / "train" / name, data)
    candidates, acc = _run(tmp_path, "kaggle", tmp_path / "train")
    assert {c.path.name: c.label for c in candidates} == {"cat.0.jpg": "cat", "cat.1.jpg": "cat", "dog.0.jpg": "dog",
                                                          "dog.12.jpg": "dog", "Thumbs.db": None}
    assert _reasons(acc) == {"Thumbs.db": "name is not <class>.<n>.<ext>"}


def test_kaggle_zip_is_extracted(tmp_path):
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as zf:
        for name, data in _kaggle_files().items():
            zf.writestr(f"train/{name}", data)
    candidates, acc = _run(tmp_path, "kaggle", tmp_path / "train.zip")
    assert sorted(acc.manifest["label"]) == ["cat", "cat", "dog", "dog"]
    assert all(str(c.path).startswith(str(tmp_path / "prepared" / "extracted")) for c in candidates)


@pytest.mark.parametrize("evil", ["../escape.jpg", "/etc/escape.jpg", "train/../../escape.jpg", "C:/escape.jpg"])
def test_zip_path_escape_is_refused(tmp_path, evil):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("train/cat.0.jpg", _jpeg(1))
        zf.writestr(evil, _jpeg(2))
    with pytest.raises(DataError, match="would land outside"):
        extract_zip(tmp_path / "evil.zip", tmp_path / "out" / "x")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.jpg").exists()


def test_zip_symlink_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        info = zipfile.ZipInfo("train/cat.0.jpg")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="would land outside"):
        extract_zip(tmp_path / "link.zip", tmp_path / "out")


@pytest.mark.parametrize("inner", [True, False])
def test_petimages_layout(tmp_path, inner):
    top = tmp_path / "raw" / "PetImages" if inner else tmp_path / "PetImages"
    _write(top / "Cat/1.jpg", _jpeg(1))
    _write(top / "Cat/2.jpg", b"")
    _write(top / "Cat/Thumbs.db", b"\xd0\xcf\x11\xe0" + bytes(64))
    _write(top / "Dog/1.jpg", _jpeg(2))
    candidates, acc = _run(tmp_path, "petimages", tmp_path / "raw" if inner else top)
    assert sorted(acc.manifest["label"]) == ["cat", "dog"]
    assert _reasons(acc) == {"2.jpg": EMPTY, "Thumbs.db": NOT_IMAGE}


def _oxford(raw):
    base = raw / "oxford-iiit-pet"
    lines = {"trainval": ["Abyssinian_1 1 1 1", "Abyssinian_2 1 1 1", "american_bulldog_3 2 2 1"],
             "test": ["Bengal_4 6 1 3", "beagle_5 4 2 3"]}
    for split, rows in lines.items():
        _write(base / "annotations" / f"{split}.txt", ("\n".join(rows) + "\n").encode())
    for i, row in enumerate(lines["trainval"] + lines["test"]):
        _write(base / "images" / f"{row.split()[0]}.jpg", _jpeg(i))
    _write(base / "images" / "Abyssinian_100.mat", b"matlab")  # the real archive has a few of these
    return base


def test_oxford_pets_from_files_already_there(tmp_path):
    _oxford(tmp_path / "raw")
    candidates, acc = _run(tmp_path, "oxford-pets", tmp_path / "raw")
    labels = dict(zip(acc.manifest["path"].map(lambda p: p.split("/")[-1]), acc.manifest["label"], strict=True))
    assert labels == {"Abyssinian_1.jpg": "cat", "Abyssinian_2.jpg": "cat", "american_bulldog_3.jpg": "dog",
                      "Bengal_4.jpg": "cat", "beagle_5.jpg": "dog"}
    assert _reasons(acc) == {"Abyssinian_100.mat": "not listed in the annotations"}
    _, acc = _run(tmp_path, "oxford-pets", tmp_path / "raw", oxford_target="category")
    assert sorted(set(acc.manifest["label"])) == ["Abyssinian", "Bengal", "american_bulldog", "beagle"]


def test_oxford_pets_offline_without_files_says_what_to_download(tmp_path):
    with pytest.raises(DataError) as err:
        find_images("oxford-pets", tmp_path / "raw", out_dir=tmp_path)
    msg = str(err.value)
    assert "images.tar.gz" in msg and "annotations.tar.gz" in msg and str(tmp_path / "raw/oxford-iiit-pet") in msg


def test_adding_images_never_moves_existing_ones(tmp_path):
    raw = tmp_path / "raw"
    for i in range(60):
        _write(raw / ("cat" if i % 2 else "dog") / f"{i}.jpg", _jpeg(i))
    _, before = _run(tmp_path, "folder", raw)
    for i in range(60, 200):
        _write(raw / ("cat" if i % 2 else "dog") / f"{i}.jpg", _jpeg(i))
    _, after = _run(tmp_path, "folder", raw)
    old = before.manifest.set_index("path")["split"]
    new = after.manifest.set_index("path")["split"]
    assert len(new) == 200 and (new.loc[old.index] == old).all()
    assert set(new) == {"train", "val", "test"}


def test_report_paths_follow_symlinks_like_resolve(tmp_path):
    root, outside = tmp_path / "project", tmp_path / "outside"
    (root / "data" / "raw" / "cat").mkdir(parents=True)
    outside.mkdir()
    (outside / "b.jpg").write_bytes(b"x")
    (root / "data" / "raw" / "cat" / "a.jpg").write_bytes(b"x")
    (root / "data" / "raw" / "dog").symlink_to(outside)  # a class folder kept elsewhere
    (root / "data" / "raw" / "cat" / "link.jpg").symlink_to(root / "data" / "raw" / "cat" / "a.jpg")
    paths = [root / "data" / "raw" / "cat" / "a.jpg", root / "data" / "raw" / "dog" / "b.jpg",
             root / "data" / "raw" / "cat" / "link.jpg", root / "data" / "raw" / "cat" / "gone.jpg"]
    expected = []
    for p in paths:
        try:
            expected.append(p.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            expected.append(str(p.resolve()))
    assert relatives(paths, root) == expected
    assert expected[1] == str(outside / "b.jpg") and expected[2] == "data/raw/cat/a.jpg"


def test_report_paths_of_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "data" / "raw" / "cat").mkdir(parents=True)
    (root / "data" / "raw" / "cat" / "a.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(root / "data")
    paths = [Path("raw/cat/a.jpg"), Path("raw/../raw/cat/a.jpg"), Path("../../elsewhere/b.jpg"), Path("top.jpg")]
    assert relatives(paths, root) == ["data/raw/cat/a.jpg", "data/raw/cat/a.jpg",
                                      str((tmp_path / "elsewhere" / "b.jpg").resolve()), "data/top.jpg"]
    assert relatives(paths, root) == [p.resolve().relative_to(root.resolve()).as_posix() if i in (0, 1, 3)
                                      else str(p.resolve()) for i, p in enumerate(paths)]
