"""Reduced copies of the JPEGs that DALI cannot decode within one decode's budget.

DALI has no DCT scaling: it decodes a JPEG at full size (libjpeg-turbo on the CPU, nvJPEG on the GPU), so a
100-megapixel photo, which the other backends decode at 1/8 scale, would cost it ~300 MB per decode, per thread and
per sample of a batch. dataset_tools/image_rules.py keeps such a file (its scaled decode fits the budget), and DALI
reads it from a copy decoded once at the least DCT reduction that fits (1/2, 1/4 or 1/8) and stored as a JPEG of
quality 95 without chroma subsampling, in the project's cache (keyed by the file's path, size and modification time,
so a changed file gets a new copy). Crop windows are drawn on the copy's size, so a sample gets the same crop,
relative to its image, as on the other backends; a training crop of at most a few hundred pixels comes from a copy
of thousands (5000 x 5000 for a 10000 x 10000 photo), so what differs is resampling noise. Copies are written
atomically: ranks of a node that make the same copy at once each write a temporary file of their own.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools.image_rules import DECODE_BUDGET, jpeg_reduction
from fastimagenet.dataset_tools.verify import cache_root


def within_budget(paths: list[str], sizes: np.ndarray) -> tuple[list[str], np.ndarray]:
    """`paths` with every image above the budget (only sequential JPEGs are kept there) replaced by its reduced
    copy, and `sizes` ((width, height) rows) by the copy's."""
    over = np.flatnonzero(sizes[:, 0].astype(np.int64) * sizes[:, 1] > DECODE_BUDGET)
    if not len(over):
        return paths, sizes
    paths, sizes = list(paths), sizes.copy()
    for i in over.tolist():
        paths[i], sizes[i] = _reduced_copy(paths[i])
    print(f"notice: DALI reads {len(over)} JPEGs above the {DECODE_BUDGET / 1e6:.1f} MP budget of one decode "
          f"from reduced copies in {_copies_dir()}")
    return paths, sizes


def _copies_dir() -> Path:
    return cache_root() / "reduced"


def _reduced_copy(path: str) -> tuple[str, tuple[int, int]]:
    try:
        stat = os.stat(path)
        key = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
        copy = _copies_dir() / f"{hashlib.sha1(key.encode()).hexdigest()[:24]}.jpg"
        if not copy.exists():
            with Image.open(path) as img:
                reduction = jpeg_reduction(*img.size)
                img.draft(img.mode, (img.width // reduction, img.height // reduction))
                pixels = img.convert("RGB")
            with atomic_output(copy) as tmp:
                pixels.save(tmp, format="JPEG", quality=95, subsampling=0)
        with Image.open(copy) as img:
            return str(copy), img.size
    except (OSError, ValueError) as exc:  # e.g. changed since it was verified
        raise UserError(f"{path}: could not make the reduced copy DALI reads ({type(exc).__name__}: {exc})") from None
