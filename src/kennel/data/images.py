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


def load_rgb(path: str | Path) -> Image.Image:
    """Open, apply EXIF orientation and convert to RGB (alpha composited on ``BACKGROUND``).

    PIL's decompression-bomb check stays on: a file over ``Image.MAX_IMAGE_PIXELS`` raises before decoding.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img.convert("RGB")


def to_array(img: Image.Image, size: int) -> np.ndarray:
    """Antialiased resize to ``size``x``size``; returns uint8 of shape (3, size, size)."""
    img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_array(path: str | Path, size: int) -> np.ndarray:
    """``path`` -> uint8 (3, size, size): the one preprocessing shared by training and prediction."""
    return to_array(load_rgb(path), size)
