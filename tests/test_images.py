"""One file -> one uint8 array: colour modes, orientation, animation, resize modes against references."""

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from kennel.data.images import PAD_FILL, RESAMPLE, DecompressionBomb, load_array, open_checked


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image: gradients plus a few soft blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([x * 200 + 30, y * 180 + 40, (x + y) * 90 + 20], axis=-1)
    for _ in range(5):
        cx, cy, r = rng.uniform(0, 1, 3) * (w / max(w, h), h / max(w, h), 1)
        img += 60 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.02 + r * 0.05))[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _chw(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16).transpose(2, 0, 1)


REFERENCES = {
    "squash": lambda img, s: img.resize((s, s), RESAMPLE),
    "center_crop": lambda img, s: TF.center_crop(TF.resize(img, s), s),  # torchvision's eval transform
    "pad": lambda img, s: ImageOps.pad(img, (s, s), RESAMPLE, color=PAD_FILL),
}


@pytest.mark.parametrize("mode", REFERENCES)
@pytest.mark.parametrize("wh", [(300, 200), (180, 400), (97, 97)])
def test_modes_match_reference_resize(tmp_path, mode, wh):
    img = _photo(*wh)
    img.save(tmp_path / "p.png")
    ours = load_array(tmp_path / "p.png", 64, mode=mode).astype(np.int16)
    ref = _chw(REFERENCES[mode](img, 64))
    assert ours.shape == (3, 64, 64)
    assert np.abs(ours - ref).max() <= 2


def test_pad_keeps_aspect_and_fills(tmp_path):
    Image.new("RGB", (100, 50), (255, 0, 0)).save(tmp_path / "wide.png")
    arr = load_array(tmp_path / "wide.png", 32, mode="pad")
    assert (arr[:, :7] == np.array(PAD_FILL)[:, None, None]).all()  # top band
    assert (arr[:, 25:] == np.array(PAD_FILL)[:, None, None]).all()  # bottom band
    assert (arr[:, 9:23] == np.array([255, 0, 0])[:, None, None]).all()


def test_center_crop_takes_the_middle(tmp_path):
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((0, 255, 0), (100, 0, 200, 100))  # green middle third
    img.save(tmp_path / "wide.png")
    arr = load_array(tmp_path / "wide.png", 32, mode="center_crop")
    assert (arr[1, :, 1:-1] > 250).all() and (arr[2, :, 1:-1] < 5).all()  # edges blend with the blue


@pytest.mark.parametrize("mode", REFERENCES)
def test_large_jpeg_decoded_in_draft_mode_stays_close(tmp_path, mode):
    img = _photo(2400, 1800)
    img.save(tmp_path / "big.jpg", quality=95)
    with Image.open(tmp_path / "big.jpg") as full:
        ref = _chw(REFERENCES[mode](full.convert("RGB"), 224))
    ours = load_array(tmp_path / "big.jpg", 224, mode=mode).astype(np.int16)
    diff = np.abs(ours - ref)
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.mean(), diff.max())


def test_unknown_mode_is_named(tmp_path):
    _photo(40, 40).save(tmp_path / "p.png")
    with pytest.raises(ValueError, match="resize.mode = 'zoom'"):
        load_array(tmp_path / "p.png", 32, mode="zoom")


def test_colour_modes_become_rgb(tmp_path):
    cases = {
        "cmyk.jpg": Image.new("CMYK", (40, 40), (0, 255, 255, 0)),  # red in CMYK
        "gray.png": Image.new("L", (40, 40), 77),
        "la.png": Image.new("LA", (40, 40), (0, 0)),  # fully transparent black
        "rgba.png": Image.new("RGBA", (40, 40), (0, 0, 255, 255)),
    }
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    cases["pal.png"] = pal
    for name, img in cases.items():
        img.save(tmp_path / name)
    get = lambda name: load_array(tmp_path / name, 16, mode="squash")[:, 8, 8].tolist()
    assert get("cmyk.jpg")[0] > 240 and max(get("cmyk.jpg")[1:]) < 15
    assert get("gray.png") == [77, 77, 77]
    assert get("la.png") == [255, 255, 255]  # transparent -> white background
    assert get("rgba.png") == [0, 0, 255]
    assert get("pal.png") == [0, 255, 0]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 32896, 65535]], dtype=np.uint16).repeat(40, axis=0).repeat(20, axis=1)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # mode I;16
    row = load_array(tmp_path / "deep.png", 60, mode="squash")[0, 30]
    assert row[5] == 0 and row[30] in (127, 128) and row[55] == 255


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    r, g, b = load_array(tmp_path / "anim.gif", 16, mode="squash")[:, 8, 8]
    assert r > 200 and b < 50


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    arr = load_array(tmp_path / "r.jpg", 32, mode="squash")
    assert arr[:, :12].mean() > 200 and arr[:, 20:].mean() < 50  # the white half is now on top


def test_pixel_limit_refuses_before_decoding(tmp_path):
    _photo(100, 100).save(tmp_path / "p.png")
    with pytest.raises(DecompressionBomb, match="10000 pixels > limit 5000"):
        open_checked(tmp_path / "p.png", max_pixels=5000)
    with pytest.raises(DecompressionBomb):
        load_array(tmp_path / "p.png", 32, mode="squash", max_pixels=5000)
