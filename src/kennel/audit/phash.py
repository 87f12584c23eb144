"""A perceptual hash that also matches mirrored copies: 256 bits from the low frequencies of the image's DCT.

The image is greyed and averaged down to 32 x 32; the top-left 16 x 16 of its 2-D DCT (the coarse layout) is
compared with its median, one bit per coefficient. Re-encoding and resizing barely move those coefficients; a
mirror moves them, so each image also stores the hash of its mirror and pairs are compared both ways. The common
8 x 8 (64-bit) hash put a quarter of the embedded synthetic drawings within 4 bits of another one (their gradient
backgrounds look alike at that scale); with 16 x 16 distinct drawings stay 44+ bits apart, while re-encoded,
resized and mirrored copies of real photos stay within 14. Crops of 5 % or more move it as far as another photo:
only pretrained features find those.
"""

from __future__ import annotations

import numpy as np
import torch

from kennel.data.vectors import Featurizer

SIDE, LOW = 32, 16
BITS = LOW * LOW
HASH_VERSION = "phash-dct16-mirror/1"
GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m.astype(np.float32)


DCT = _dct_matrix(SIDE)[:LOW]  # only the low frequencies are kept


def hash_bits(images: np.ndarray) -> np.ndarray:
    """uint8 N x 3 x S x S -> N x 32 bytes: the hash bits, packed."""
    grey = np.tensordot(np.asarray(images, dtype=np.float32), GREY, axes=([1], [0]))  # N x S x S
    small = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(grey)[:, None], SIDE)[:, 0].numpy()
    low = DCT @ small @ DCT.T  # N x 16 x 16
    flat = low.reshape(len(low), -1)
    return np.packbits(flat > np.median(flat, axis=1, keepdims=True), axis=1)


def mirror_hashes(images: np.ndarray) -> np.ndarray:
    """N x 64 bytes: the hash of each image, then the hash of its mirror."""
    images = np.asarray(images)
    return np.concatenate([hash_bits(images), hash_bits(images[..., ::-1])], axis=1)


def phash_featurizer(size: int, recipe: str) -> Featurizer:
    return Featurizer("phash", f"{HASH_VERSION}|{size}|{recipe}", 2 * BITS // 8, "uint8", mirror_hashes)
