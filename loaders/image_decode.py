"""Decode one image straight to its crop at the output size (HWC uint8 RGB), as cheaply as the crop allows.

JPEGs (nearly all of ImageNet) go through OpenCV's libjpeg-turbo with DCT-domain downscaling: when the crop is at
least 2x, 4x or 8x the output size, the decoder itself produces a 1/2, 1/4 or 1/8 image, which is several times
cheaper than decoding at full size. The resize is area-averaging when shrinking (antialiased, like PIL's) and
bilinear when enlarging. Everything else (PNG, a PNG named .JPEG, BMP, WebP, ...) goes through PIL.
EXIF orientation is ignored, as torchvision's ImageFolder and FFCV do.

Loaders decode only files dataset_tools/verify.py kept; the header is checked again here (format, pixel limit:
dataset_tools/image_rules.py) so that a file changed since is refused before anything is allocated for it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from dataset_tools.image_rules import header_problem, to_plain_mode
from loaders.augment import Box

# The DCT-scaling bits of OpenCV's read flags, combined below with RGB output (libjpeg then writes RGB itself).
_SCALE_BITS = {1: 0, 2: cv2.IMREAD_REDUCED_COLOR_2 & ~cv2.IMREAD_COLOR, 4: cv2.IMREAD_REDUCED_COLOR_4 & ~cv2.IMREAD_COLOR,
               8: cv2.IMREAD_REDUCED_COLOR_8 & ~cv2.IMREAD_COLOR}
_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION


class UnreadableImage(Exception):
    pass


def single_threaded_worker(_worker_id: int) -> None:
    """DataLoader worker init: each worker is one process on one core; OpenCV's own thread pool would oversubscribe."""
    cv2.setNumThreads(1)


def decode_crop(path: str, box_of, size: int, flip: bool) -> np.ndarray:
    """Decode `path`, crop the box `box_of(width, height)` and resize it to size x size."""
    with Image.open(path) as img:  # reads the header only
        problem = header_problem(img)
        if problem:
            raise UnreadableImage(problem)
        width, height = img.size
        box = box_of(width, height)
        if img.format != "JPEG":
            return _pil_crop(img, box, size, flip)
    return _jpeg_crop(path, width, height, box, size, flip)


def _jpeg_crop(path: str, width: int, height: int, box: Box, size: int, flip: bool) -> np.ndarray:
    data = np.fromfile(path, dtype=np.uint8)
    # libjpeg fills a truncated file with grey and only warns; a whole JPEG has its end-of-image marker after the scan
    if not _has_end_marker(data.tobytes()):
        raise UnreadableImage("truncated JPEG (no end-of-image marker)")
    reduction = min(box[2] - box[0], box[3] - box[1]) / size
    scale = max(s for s in _SCALE_BITS if s <= max(1.0, reduction))
    rgb = cv2.imdecode(data, _SCALE_BITS[scale] | _RGB)
    if rgb is None:
        raise UnreadableImage("not a decodable JPEG")
    sx, sy = rgb.shape[1] / width, rgb.shape[0] / height
    left, top = int(box[0] * sx), int(box[1] * sy)
    right, bottom = max(left + 1, math.ceil(box[2] * sx)), max(top + 1, math.ceil(box[3] * sy))
    crop = rgb[top:bottom, left:right]
    shrinking = crop.shape[0] > size or crop.shape[1] > size
    out = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return cv2.flip(out, 1) if flip else out


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
            return data.find(b"\xff\xd9", pos + 2 + length) >= 0
        pos += 2 + length
    return False


def _pil_crop(img: Image.Image, box: Box, size: int, flip: bool) -> np.ndarray:
    img = to_plain_mode(img)  # palette, alpha, 16-bit: resize needs a plain mode
    out = img.resize((size, size), Image.BILINEAR, box=box)
    if out.mode != "RGB":
        out = out.convert("RGB")
    array = np.asarray(out)
    return array[:, ::-1] if flip else array
