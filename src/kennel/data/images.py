"""Decode one image file into the uint8 CHW array every stage uses.

``load_array`` is the only preprocessing in kennel: the resize stage and prediction both call it, so a file gives
the same tensor at train time and at predict time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Transparent pixels are composited on one fixed colour so the same file always gives the same pixels.
BACKGROUND = (255, 255, 255)
# `pad` fills with the ImageNet mean colour, which the model's normalisation maps to ~0.
PAD_FILL = (124, 116, 104)
MODES = ("squash", "center_crop", "pad")
RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking: PIL widens the filter with the scale


class DecompressionBomb(ValueError):
    """An image whose pixel count is over the limit; raised from the header, before any decoding."""


def open_header(path: str | Path) -> Image.Image:
    """Open an image reading its header only, with no pixel limit: the caller checks the size."""
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our check, with our limit and message
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def bomb_message(width: int, height: int, limit: int | None) -> str:
    """Why an image is refused as a decompression bomb; "" when it is within ``limit`` (0/None: no limit)."""
    return f"{width}x{height} = {width * height} pixels > limit {limit}" if limit and width * height > limit else ""


def open_checked(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open (header only) and refuse images over ``max_pixels`` (default: PIL's limit) before any decoding."""
    img = open_header(path)
    bomb = bomb_message(img.width, img.height, max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS)
    if bomb:
        img.close()
        raise DecompressionBomb(bomb)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF orientation applied, alpha composited on ``BACKGROUND``, 16-bit scaled to 8."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # PIL's own conversion clips 16-bit values at 255; scale the full range down instead.
        wide = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode.startswith("I;16") or wide.max() > 255 else 255
        img = Image.fromarray((np.clip(wide, 0, top) * 255 // top).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def to_array(img: Image.Image, size: int, *, mode: str) -> np.ndarray:
    """Antialiased resize of an RGB image to ``size``x``size`` by ``mode``; returns uint8 (3, size, size).

    squash: stretch to the square (aspect ratio not kept); center_crop: shorter side to ``size``, then the centre
    square (torchvision's eval transform); pad: longer side to ``size``, then pad to a square with ``PAD_FILL``.
    """
    w, h = img.size
    if mode == "squash":
        out = img.resize((size, size), RESAMPLE)
    elif mode == "center_crop":
        # torchvision's Resize(size) + CenterCrop(size) arithmetic, so results match its eval transform
        rw, rh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
        out = img.resize((rw, rh), RESAMPLE).crop((left, top, left + size, top + size))
    elif mode == "pad":
        out = ImageOps.pad(img, (size, size), RESAMPLE, color=PAD_FILL)
    else:
        raise ValueError(f"resize.mode = {mode!r}: allowed: {' | '.join(MODES)}")
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy()


def _draft_size(w: int, h: int, size: int, mode: str) -> tuple[int, int]:
    """The smallest decode size that still leaves ``mode`` at least ``size`` pixels to resize from."""
    scale = size / (max(w, h) if mode == "pad" else min(w, h))
    return (max(size, int(w * scale) + 1), max(size, int(h * scale) + 1)) if mode != "squash" else (size, size)


def load_array(path: str | Path, size: int, *, mode: str, max_pixels: int | None = None) -> np.ndarray:
    """``path`` -> uint8 (3, size, size): the one preprocessing shared by training and prediction.

    JPEGs at least twice the target are decoded DCT-scaled (PIL draft mode): a 3000 px photo decodes at 1/4 or
    1/8 scale, several times faster, and is then resized with the same antialiased filter.
    """
    with open_checked(path, max_pixels) as img:
        img.seek(0)
        if img.format == "JPEG" and min(img.size) >= 2 * size:
            img.draft("RGB", _draft_size(img.width, img.height, size, mode))
        return to_array(to_rgb(img), size, mode=mode)
