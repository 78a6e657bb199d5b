"""The augmentation every backend applies, described once by the `data.*` settings (Augmentation).

Train: random-resized-crop (area fraction `data.scale`, aspect ratio `data.ratio`) then horizontal flip.
Eval: resize the shorter side to resolution / crop_ratio, then take the centre crop of side `resolution`;
that is the same as resizing a centred square of side `crop_ratio * shorter side`, which is how we compute it.
Boxes are (left, top, right, bottom) in source-image pixels, so a backend can crop before or during decode.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np

Box = tuple[float, float, float, float]


class Augmentation(Protocol):
    """The `data.*` settings the augmentation reads (fastimagenet.config.DataConfig has them). Named here, not
    imported from the config, so that loaders/ never imports the config that composes their option sections."""

    scale: tuple[float, float]  # random-resized-crop area fraction
    ratio: tuple[float, float]  # random-resized-crop aspect ratio
    flip: bool
    crop_ratio: float  # eval: centre crop side / shorter image side


# Each training sample's randomness: 3 + 2 x _ATTEMPTS uniforms in [0, 1), a pure function of (seed, epoch, index).
# Column 0 draws the flip, then each attempt's area fraction and log aspect ratio, then the crop's left and top.
_ATTEMPTS = 10
_FLIP, _AREAS, _ASPECTS, _LEFT, _TOP = 0, slice(1, 1 + _ATTEMPTS), slice(1 + _ATTEMPTS, 1 + 2 * _ATTEMPTS), -2, -1
_UNIFORMS = 3 + 2 * _ATTEMPTS
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: the counters' stride


def _mix(bits: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 in which every output bit depends on every input bit (numpy
    arrays wrap on overflow, as the hash needs)."""
    bits = (bits ^ (bits >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    bits = (bits ^ (bits >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return bits ^ (bits >> np.uint64(31))


def crop_uniforms(indices: Sequence[int] | np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Per-sample randomness that depends only on (seed, epoch, index): one row of uniforms per sample, the same
    whichever worker, thread or rank draws it, so runs are reproducible and resumable. Counter-based (a hash of the
    key and the column), so a batch's rows come from a few array operations: no Python per sample on the thread
    that feeds the decoder."""
    key = _mix(np.array([seed % 2**64], np.uint64) + _GOLDEN)
    key = _mix(key ^ np.uint64(epoch % 2**64))
    per_sample = _mix(key ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))
    bits = _mix(per_sample[:, None] + np.arange(1, _UNIFORMS + 1, dtype=np.uint64) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # the top 53 bits: every double in [0, 1) a step


def crop_flips(uniforms: np.ndarray, aug: Augmentation) -> np.ndarray:
    """Which samples are mirrored: about half with data.flip, none without."""
    return (uniforms[:, _FLIP] < 0.5) & aug.flip


def crop_boxes(uniforms: np.ndarray, sizes: np.ndarray, aug: Augmentation) -> np.ndarray:
    """Random-resized-crop boxes, one row per sample of `uniforms`, in images of the (width, height) rows of `sizes`:
    the first of _ATTEMPTS draws of area fraction and aspect ratio that fits, placed uniformly; when every draw
    misses, the largest centred crop whose aspect ratio is within bounds (the sampling rule torchvision, FFCV and
    DALI share)."""
    width, height = (sizes[:, axis].astype(np.float64) for axis in (0, 1))
    log_lo, log_hi = np.log(aug.ratio[0]), np.log(aug.ratio[1])
    target_area = (width * height)[:, None] * (aug.scale[0] + (aug.scale[1] - aug.scale[0]) * uniforms[:, _AREAS])
    aspect = np.exp(log_lo + (log_hi - log_lo) * uniforms[:, _ASPECTS])
    w, h = np.sqrt(target_area * aspect), np.sqrt(target_area / aspect)
    fits = (w > 0) & (w <= width[:, None]) & (h <= height[:, None])
    rows, first = np.arange(len(sizes)), fits.argmax(axis=1)
    hit, w, h = fits[rows, first], w[rows, first], h[rows, first]
    image_aspect = width / height
    too_tall, too_wide = image_aspect < aug.ratio[0], image_aspect > aug.ratio[1]
    w = np.where(hit, w, np.where(too_wide, height * aug.ratio[1], width))
    h = np.where(hit, h, np.where(too_tall, width / aug.ratio[0], height))
    left = np.where(hit, uniforms[:, _LEFT], 0.5) * (width - w)
    top = np.where(hit, uniforms[:, _TOP], 0.5) * (height - h)
    return np.stack([left, top, left + w, top + h], axis=1)


def center_crop_box(width: int, height: int, crop_ratio: float) -> Box:
    side = min(width, height) * crop_ratio
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


class TrainCrops:
    """A batch's training crops, drawn together from the image sizes a backend recorded (rows by index), for a
    decoder that learns each size from the header as it decodes: box_of(k)(width, height) is sample k's box; an image
    whose header gives another size (changed since it was recorded) gets its box for that size, from the same
    randomness. The crops crop_windows gives, on every backend, and again for a resumed epoch."""

    def __init__(self, indices: Sequence[int], sizes: np.ndarray, seed: int, epoch: int, aug: Augmentation):
        self._uniforms, self._aug = crop_uniforms(indices, seed, epoch), aug
        self._sizes = [tuple(size) for size in sizes[np.asarray(indices, dtype=np.int64)].tolist()]
        self._boxes = [tuple(box) for box in crop_boxes(self._uniforms, np.array(self._sizes), aug).tolist()]
        self.flips = crop_flips(self._uniforms, aug).tolist()

    def box_of(self, k: int) -> Callable[[int, int], Box]:
        def box(width: int, height: int) -> Box:
            if (width, height) == self._sizes[k]:
                return self._boxes[k]
            return tuple(crop_boxes(self._uniforms[k : k + 1], np.array([(width, height)]), self._aug)[0].tolist())
        return box


def pixel_windows(boxes: np.ndarray, scale_x: float = 1.0, scale_y: float = 1.0) -> np.ndarray:
    """The whole pixels (left, top, right, bottom) that cover each box row in the image decoded at (scale_x,
    scale_y) of its size, at least one wide and high: what a backend crops before resizing."""
    left, top = np.floor(boxes[:, 0] * scale_x), np.floor(boxes[:, 1] * scale_y)
    right = np.maximum(left + 1, np.ceil(boxes[:, 2] * scale_x))
    bottom = np.maximum(top + 1, np.ceil(boxes[:, 3] * scale_y))
    return np.stack([left, top, right, bottom], axis=1).astype(np.int64)


def crop_windows(indices: Sequence[int] | np.ndarray, sizes: np.ndarray, seed: int, epoch: int,
                 aug: Augmentation) -> np.ndarray:
    """A batch's training crops for a decoder that takes them in whole pixels: one int32 row per sample, (left, top,
    right, bottom, flip), from each sample's (width, height) in `sizes` (rows by index)."""
    indices = np.asarray(indices, dtype=np.int64)
    uniforms = crop_uniforms(indices, seed, epoch)
    windows = pixel_windows(crop_boxes(uniforms, sizes[indices], aug))
    return np.concatenate([windows, crop_flips(uniforms, aug)[:, None]], axis=1).astype(np.int32)
