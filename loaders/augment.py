"""The augmentation every backend applies, described once by the `data.*` settings (DataConfig).

Train: random-resized-crop (area fraction `data.scale`, aspect ratio `data.ratio`) then horizontal flip.
Eval: resize the shorter side to resolution / crop_ratio, then take the centre crop of side `resolution`;
that is the same as resizing a centred square of side `crop_ratio * shorter side`, which is how we compute it.
Boxes are (left, top, right, bottom) in source-image pixels, so a backend can crop before or during decode.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np

from fastimagenet.config import DataConfig

Box = tuple[float, float, float, float]


def random_resized_crop_box(width: int, height: int, aug: DataConfig, rng: random.Random) -> Box:
    """A random crop of the given area fraction and aspect ratio; after 10 misses, the largest centred crop whose
    aspect ratio is within bounds (the sampling rule torchvision, FFCV and DALI share)."""
    area = width * height
    log_lo, log_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(*aug.scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target_area * aspect)
        h = math.sqrt(target_area / aspect)
        if 0 < w <= width and 0 < h <= height:
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            return (left, top, left + w, top + h)
    aspect = width / height
    if aspect < aug.ratio[0]:
        w, h = width, width / aug.ratio[0]
    elif aspect > aug.ratio[1]:
        w, h = height * aug.ratio[1], height
    else:
        w, h = width, height
    left, top = (width - w) / 2, (height - h) / 2
    return (left, top, left + w, top + h)


def center_crop_box(width: int, height: int, crop_ratio: float) -> Box:
    side = min(width, height) * crop_ratio
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def train_crop(seed: int, epoch: int, index: int, aug: DataConfig) -> tuple[Callable[[int, int], Box], bool]:
    """Sample `index`'s augmentation in `epoch`: (box_of, flip), where box_of(width, height) is its
    random-resized-crop box in an image of that size (a decoder may learn the size from the header). Drawn from
    (seed, epoch, index) alone, so every backend that draws per sample gives it the same crop, as does a resumed
    epoch."""
    rng = sample_rng(seed, epoch, index)
    flip = aug.flip and rng.random() < 0.5
    return (lambda width, height: random_resized_crop_box(width, height, aug, rng)), flip


def pixel_window(box: Box, scale_x: float = 1.0, scale_y: float = 1.0) -> tuple[int, int, int, int]:
    """The whole pixels (left, top, right, bottom) that cover `box` in the image decoded at (scale_x, scale_y) of
    its size, at least one wide and high: what a backend crops before resizing."""
    left, top = int(box[0] * scale_x), int(box[1] * scale_y)
    return left, top, max(left + 1, math.ceil(box[2] * scale_x)), max(top + 1, math.ceil(box[3] * scale_y))


def crop_windows(indices: Sequence[int], sizes: np.ndarray, seed: int, epoch: int,
                 aug: DataConfig) -> np.ndarray:
    """A batch's training crops for a decoder that takes them in whole pixels: one int32 row per sample, (left, top,
    right, bottom, flip), drawn with train_crop from each sample's (width, height) in `sizes` (rows by index)."""
    indices = np.asarray(indices, dtype=np.int64)
    rows = np.empty((len(indices), 5), dtype=np.int32)
    for row, (index, size) in enumerate(zip(indices.tolist(), sizes[indices].tolist())):  # Python ints: seedable
        box_of, flip = train_crop(seed, epoch, index, aug)
        rows[row] = (*pixel_window(box_of(*size)), flip)
    return rows


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Per-sample randomness that depends only on (seed, epoch, index): the same crops whichever worker or rank
    decodes the sample, so runs are reproducible and resumable."""
    return random.Random((seed * 1_000_003 + epoch) * 1_000_000_007 + index)
