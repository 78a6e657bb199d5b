"""Decode one image straight to its crop at the output size (HWC uint8 RGB), as cheaply as the crop allows.

JPEGs (nearly all of ImageNet) are decoded by libjpeg-turbo through loaders/_jpeg_roi.c, which decodes only the
crop's region (the rows above it are skipped, those below never read, the columns cut to it) and scales it in the
DCT domain: when the crop is at least 2x, 4x or 8x the output size, the decoder itself produces it at 1/2, 1/4 or
1/8 scale. A random-resized crop covers about half the image on average, so much of the decode never happens. What
remains is a shrink by less than 2x (or an enlargement): bilinear where that is as good as an area average, area
averaging where bilinear would alias (BENCHMARKS.md; held by the quality guard in tests/test_image_decode.py).
Everything else (PNG, a PNG named .JPEG, BMP, WebP, CMYK JPEGs, ...) goes through PIL.
EXIF orientation is ignored, as torchvision's ImageFolder and FFCV do.

Loaders decode only files dataset_tools/verify.py kept; the header is checked again here (format, pixel limit:
dataset_tools/image_rules.py) so that a file changed since is refused before anything is allocated for it.
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import cv2
import numpy as np
from PIL import Image

from fastimagenet.dataset_tools.image_rules import header_problem, to_plain_mode
from fastimagenet.loaders.augment import Box, pixel_windows

try:
    from fastimagenet.loaders._jpeg_roi import Error as JpegError, area_resize, decode_region
except ImportError:  # a checkout never built (no compiler, no libjpeg-dev): everything decodes through PIL
    area_resize = decode_region = JpegError = None
    print("notice: the JPEG region decoder (loaders/_jpeg_roi.c) is not built, so JPEGs decode whole through PIL "
          "(slower); `pip install -e .` builds it (needs gcc and libjpeg-dev)", file=sys.stderr)

_AREA_FROM = 1.5  # the shrink from which the resize averages areas instead of interpolating (see _jpeg_crop)


class UnreadableImage(Exception):
    pass


def single_threaded_worker(_worker_id: int) -> None:
    """DataLoader worker init: each worker is one process on one core; OpenCV's own thread pool would oversubscribe."""
    cv2.setNumThreads(1)


@contextmanager
def forking_workers() -> Iterator[None]:
    """Around the start of forked DataLoader workers: OpenCV's thread pool is shrunk to one thread in the parent, so
    each child inherits a pool it can use and resize. A child that inherits a running pool (the parent resized a
    large image before) and changes its thread count (single_threaded_worker) waits for the pool's threads, which
    did not come along with the fork, for ever. The parent's thread count is restored afterwards."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def decode_crop(path, box_of, size: int, flip: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Decode `path`, crop the box `box_of(width, height)` and resize it to size x size: into `out` (a C-contiguous
    size x size x 3 uint8 array, e.g. a slot of a batch) when given, so a batch is decoded in place. `path`: a file
    name, or an object whose `read_bytes()` gives the encoded image (a sample inside a shard: loaders/shard_source.py)."""
    data = None if isinstance(path, (str, os.PathLike)) else path.read_bytes()
    with Image.open(path if data is None else io.BytesIO(data)) as img:  # reads the header only
        problem = header_problem(img)
        if problem:
            raise UnreadableImage(problem)
        width, height = img.size
        box = box_of(width, height)
        # libjpeg does not convert CMYK to RGB; PIL does
        if decode_region is None or img.format != "JPEG" or img.mode == "CMYK":
            array = _pil_crop(img, box, size, flip)
            if out is None:
                return array
            out[...] = array
            return out
    if data is None:
        with open(path, "rb") as file:
            data = file.read()
    return _jpeg_crop(data, box, size, flip, out)


def dct_reduction(window_side: float, output_side: float) -> int:
    """The largest DCT reduction (1, 2, 4 or 8) that leaves a window's shorter side at least the output's. Plain
    arithmetic, so FFCV's compiled pipeline (loaders/ffcv_window_decoder.py) compiles and calls it too."""
    reduction = window_side / output_side
    return 8 if reduction >= 8 else 4 if reduction >= 4 else 2 if reduction >= 2 else 1


def _dct_scale(box: Box, size: int) -> int:
    return dct_reduction(min(box[2] - box[0], box[3] - box[1]), size)


def _jpeg_crop(data: bytes, box: Box, size: int, flip: bool, out: np.ndarray | None) -> np.ndarray:
    # libjpeg fills a truncated file with grey and only warns; a whole JPEG has its end-of-image marker after the scan
    if not _has_end_marker(data):
        raise UnreadableImage("truncated JPEG (no end-of-image marker)")
    scale = _dct_scale(box, size)
    # the whole pixels of the scaled image
    left, top, right, bottom = pixel_windows(np.array([box]), 1 / scale, 1 / scale)[0].tolist()
    try:
        pixels, width, height, x_offset = decode_region(data, scale, left, top, right, bottom)
    except JpegError as exc:
        raise UnreadableImage(f"not a decodable JPEG ({exc})") from None
    crop_width = min(right - left, width - x_offset)  # the box, clamped to the image by the decoder
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    # What DCT scaling leaves is a shrink by less than 2x: bilinear below _AREA_FROM, where it is as good as an area
    # average at a fifth of the cost; above it bilinear aliases (BENCHMARKS.md: quality of the resize), so the area
    # average, by the extension (OpenCV's INTER_AREA gives the same pixels, within 1 level, at 3-4x the time).
    if max(crop_width, height) >= _AREA_FROM * size and min(crop_width, height) >= size:
        area_resize(pixels, width, x_offset, crop_width, height, out, flip)
        return out
    crop = np.frombuffer(pixels, np.uint8).reshape(height, width, 3)[:, x_offset:x_offset + crop_width]
    shrink = max(crop.shape[:2]) / size
    # resized and flipped in place in `out`: no array per sample, no copy into the batch
    cv2.resize(crop, (size, size), dst=out, interpolation=cv2.INTER_AREA if shrink >= _AREA_FROM else cv2.INTER_LINEAR)
    return cv2.flip(out, 1, dst=out) if flip else out


def _has_end_marker(data: bytes) -> bool:
    """An EOI marker after the first scan. The marker segments before it are skipped by their lengths, because an
    EXIF thumbnail (in APP1) is a whole JPEG with an EOI of its own; data after the EOI (as some cameras append)
    does not matter, as for PIL."""
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xDA:  # start of scan: entropy-coded data, where 0xFF is escaped, up to EOI
            return data.rfind(b"\xff\xd9", pos + 2 + length) >= 0  # from the end: found at once in a whole file
        pos += 2 + length
    return False


def _pil_crop(img: Image.Image, box: Box, size: int, flip: bool) -> np.ndarray:
    if img.format == "JPEG":  # a CMYK JPEG (or any without the region decoder): decoded at the DCT scale, as there
        width, scale = img.width, _dct_scale(box, size)
        drafted = img.draft(img.mode, (width // scale, img.height // scale))
        if drafted is not None:  # the box in the reduced image's coordinates: PIL's decoder scales by 1/k exactly
            box = tuple(c * drafted[1][2] / width for c in box)
    img = to_plain_mode(img)  # palette, alpha, 16-bit: resize needs a plain mode
    out = img.resize((size, size), Image.BILINEAR, box=box)
    if out.mode != "RGB":
        out = out.convert("RGB")
    array = np.asarray(out)
    return array[:, ::-1] if flip else array
