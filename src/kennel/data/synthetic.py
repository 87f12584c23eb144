"""A deterministic two-class image set drawn from a seed, so the pipeline runs with no download.

"cat" scenes show a round head with pointed ears, whiskers and stripes; "dog" scenes a wider head with floppy
ears, a snout and spots. Colour, position, scale, background, clutter and noise are drawn from the same
distributions for both classes, so only the animal's shape and markings tell them apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("cat", "dog")
CANVAS = 256  # drawn at this size; the resize stage brings it to resize.size


def render(label: str, seed: int, index: int) -> Image.Image:
    """One RGB scene of ``label``; the same (label, seed, index) always gives the same pixels."""
    if label not in CLASSES:
        raise ValueError(f"unknown synthetic class {label!r}: allowed: {', '.join(CLASSES)}")
    rng = np.random.default_rng([seed, CLASSES.index(label), index])
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng)
    r = CANVAS * rng.uniform(0.16, 0.26)  # head radius
    cx, cy = rng.uniform(r * 1.4, CANVAS - r * 1.4, size=2)
    fur = _colour(rng)
    mark = tuple(int(c * rng.uniform(0.3, 0.6)) for c in fur)
    (_cat if label == "cat" else _dog)(draw, rng, cx, cy, r, fur, mark)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2)))
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 14), (CANVAS, CANVAS, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_synthetic(out_dir: Path, per_class: int, seed: int) -> list[tuple[Path, str]]:
    """Write ``per_class`` JPEGs per class under ``out_dir/<class>/``; returns (path, label) pairs."""
    written = []
    for label in CLASSES:
        class_dir = out_dir / label
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = class_dir / f"{label}_{i:05d}.jpg"
            render(label, seed, i).save(path, quality=92)
            written.append((path, label))
    return written


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(30, 226, size=3))


def _background(rng: np.random.Generator) -> Image.Image:
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    t = np.linspace(0, 1, CANVAS, dtype=np.float32)
    ramp = t[:, None] if rng.random() < 0.5 else t[None, :]
    grad = a + (b - a) * np.broadcast_to(ramp, (CANVAS, CANVAS))[..., None]
    return Image.fromarray(grad.astype(np.uint8), "RGB")


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    for _ in range(rng.integers(2, 7)):
        x0, y0 = rng.uniform(0, CANVAS, size=2)
        w, h = rng.uniform(10, 60, size=2)
        box = [x0, y0, x0 + w, y0 + h]
        if rng.random() < 0.5:
            draw.rectangle(box, fill=_colour(rng))
        else:
            draw.line(box, fill=_colour(rng), width=int(rng.integers(2, 6)))


def _cat(draw, rng, cx, cy, r, fur, mark) -> None:
    tilt = rng.uniform(-0.25, 0.25) * r
    for side in (-1, 1):  # pointed ears standing up
        base = cx + side * r * 0.55
        tip = (cx + side * r * rng.uniform(0.7, 0.95) + tilt, cy - r * rng.uniform(1.35, 1.6))
        draw.polygon([(base - r * 0.35, cy - r * 0.6), (base + r * 0.35, cy - r * 0.75), tip], fill=fur)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fur)
    for k in range(int(rng.integers(3, 6))):  # forehead stripes
        x = cx + (k - 2) * r * 0.18
        draw.line([(x, cy - r * 0.9), (x, cy - r * 0.45)], fill=mark, width=max(2, int(r * 0.07)))
    _eyes(draw, cx, cy - r * 0.15, r, slit=True)
    draw.polygon([(cx - r * 0.1, cy + r * 0.2), (cx + r * 0.1, cy + r * 0.2), (cx, cy + r * 0.32)], fill=mark)
    for side in (-1, 1):  # whiskers
        for dy in (-0.08, 0.05, 0.18):
            draw.line([(cx + side * r * 0.2, cy + r * 0.3), (cx + side * r * 1.3, cy + r * (0.3 + dy * 2))],
                      fill=(235, 235, 235), width=max(1, int(r * 0.03)))


def _dog(draw, rng, cx, cy, r, fur, mark) -> None:
    w = r * rng.uniform(1.05, 1.2)
    for side in (-1, 1):  # floppy ears hanging down the sides
        ex = cx + side * w * 0.95
        draw.ellipse([ex - r * 0.35, cy - r * 0.7, ex + r * 0.35, cy + r * 0.75], fill=mark)
    draw.ellipse([cx - w, cy - r, cx + w, cy + r], fill=fur)
    for _ in range(int(rng.integers(2, 5))):  # spots
        sx, sy = cx + rng.uniform(-0.6, 0.6) * w, cy + rng.uniform(-0.8, -0.2) * r
        s = r * rng.uniform(0.12, 0.22)
        draw.ellipse([sx - s, sy - s, sx + s, sy + s], fill=mark)
    _eyes(draw, cx, cy - r * 0.2, r, slit=False)
    draw.ellipse([cx - r * 0.45, cy + r * 0.05, cx + r * 0.45, cy + r * 0.75], fill=(225, 210, 190))  # snout
    draw.ellipse([cx - r * 0.17, cy + r * 0.1, cx + r * 0.17, cy + r * 0.33], fill=(20, 20, 20))  # nose
    draw.line([(cx - r * 0.2, cy + r * 0.6), (cx + r * 0.2, cy + r * 0.6)], fill=(60, 30, 30), width=2)


def _eyes(draw, cx, cy, r, slit: bool) -> None:
    for side in (-1, 1):
        ex = cx + side * r * 0.38
        draw.ellipse([ex - r * 0.14, cy - r * 0.14, ex + r * 0.14, cy + r * 0.14], fill=(240, 230, 120))
        pupil = r * (0.04 if slit else 0.09)
        draw.ellipse([ex - pupil, cy - r * 0.12, ex + pupil, cy + r * 0.12], fill=(10, 10, 10))
