"""The one rule for which image files a dataset keeps, shared by every backend and by `convert`.

A file is kept by every backend or reported by every backend: dataset_tools/verify.py applies `header_problem` and
a decode to each file before any loader (or `convert`) uses it, and the decoders check the header again in case a
file changed since. Kept formats are those that PIL (torchvision backend, convert) and DALI (CPU and GPU) both
decode; GIF (animated or not) and JPEG 2000 are not among them.

Size: one decode may produce at most DECODE_BUDGET pixels, counted for the decode this project actually performs,
and checked from the header before a single pixel is allocated (a small PNG can claim 900 megapixels: a
decompression bomb). A JPEG decodes at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling: the region decoder,
convert and verification all use it), so a 100-megapixel photo costs what a 1.6-megapixel one does, and a sequential
JPEG is kept when its 1/8-scale decode fits. Every other decode is whole: other formats, and progressive or
multi-scan JPEGs, whose decoder holds the whole image's DCT coefficients (2 bytes each, 3 bytes a pixel at 4:2:0)
whatever the output scale. DALI cannot decode at a reduced scale: it reads a JPEG above the budget from a reduced
copy (loaders/reduced_jpegs.py), so the kept set is the same for every backend. A JPEG header cannot claim more
pixels than its data can carry (at least one bit per 8x8 block, the least a Huffman-coded scan spends): libjpeg
would fill the missing rows with grey and only warn.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

KEPT_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP"})  # as PIL names the formats

# PIL's own warning threshold (~89.5 MP; one RGB image at the limit is ~256 MiB). The largest ImageNet photo is far
# below it.
DECODE_BUDGET = 89_478_485  # pixels
JPEG_REDUCTIONS = (1, 2, 4, 8)  # libjpeg-turbo's DCT scalings (its fast SIMD inverse transforms)

# PIL refuses images above twice its own threshold when it opens them, counting the header's pixels whatever the
# decode; header_problem's count of the decode performed replaces it (tested with PIL's limit on and off).
Image.MAX_IMAGE_PIXELS = None

# The shortest side a .beton may store: FFCV 1.0.2's centre-crop decoder takes int(crop_ratio * shorter side)
# pixels, and an empty crop aborts the process inside OpenCV's resize (convert enlarges smaller images to this).
MIN_STORED_SIDE = 16


def header_problem(img: Image.Image) -> str | None:
    """Why an opened (header-only) image is not kept, or None: format and size, before anything is decoded."""
    if img.format not in KEPT_FORMATS:
        return f"{img.format} images are not supported (kept formats: {', '.join(sorted(KEPT_FORMATS))})"
    width, height = img.size
    if width < 1 or height < 1:
        return f"empty image ({width}x{height})"
    size = f"{width}x{height} = {width * height / 1e6:,.0f} megapixels"
    if img.format == "JPEG":
        stored, needed = _file_size(img), _least_jpeg_bytes(width, height)
        if stored is not None and stored < needed:
            return (f"{size}, but its {stored:,} bytes cannot hold them (a JPEG needs at least {needed:,}: a damaged "
                    "header or a decompression bomb); refused before decoding")
    if width * height > DECODE_BUDGET and not _decodes_scaled(img):
        how = ("a progressive or multi-scan JPEG, whose decoder holds the whole image" if img.format == "JPEG"
               else "decoded whole")
        return (f"{size} ({how}) is above the {DECODE_BUDGET / 1e6:.1f} MP budget of one decode (a decompression "
                "bomb or a damaged header); refused before decoding")
    return None


def _decodes_scaled(img: Image.Image) -> bool:
    """Whether the image decodes at 1/8 of its size within the budget: a sequential JPEG (at most 65535 x 65535, so
    at most 67 MP at 1/8). Read only for images above the budget: it costs a few reads of the file."""
    return img.format == "JPEG" and not jpeg_decodes_whole(img)


def jpeg_reduction(width: int, height: int) -> int:
    """The least DCT reduction (1, 2, 4 or 8) at which a whole sequential JPEG of this size decodes within the
    budget (8 when none does: the header check refused those)."""
    return next((k for k in JPEG_REDUCTIONS if math.ceil(width / k) * math.ceil(height / k) <= DECODE_BUDGET), 8)


def jpeg_decodes_whole(img: Image.Image) -> bool:
    """Whether libjpeg holds this JPEG's whole coefficient image while decoding it: progressive frames, and
    sequential ones whose first scan carries fewer components than the frame (each scan a component: multi-scan)."""
    if img.info.get("progressive"):
        return True
    return _first_scan_components(img) < img.layers


def _file_descriptor(img: Image.Image) -> int | None:
    try:
        return img.fp.fileno()
    except (AttributeError, OSError, ValueError):  # opened from memory, not from a file
        return None


def _file_size(img: Image.Image) -> int | None:
    fd = _file_descriptor(img)
    return None if fd is None else os.fstat(fd).st_size  # from memory: no bound to check


def _least_jpeg_bytes(width: int, height: int) -> int:
    return math.ceil(width / 8) * math.ceil(height / 8) // 8


def _first_scan_components(img: Image.Image) -> int:
    """The component count of the JPEG's first start-of-scan segment, read from the file without moving PIL's
    position in it (0 when the file ends first: the decode then reports it)."""
    fd = _file_descriptor(img)
    if fd is None:
        return img.layers  # opened from memory: taken as interleaved
    pos = 2  # after SOI
    while True:
        head = os.pread(fd, 5, pos)
        if len(head) < 5 or head[0] != 0xFF:
            return 0
        if head[1] == 0xFF:  # fill byte
            pos += 1
            continue
        if head[1] == 0xDA:
            return head[4]
        pos += 2 + ((head[2] << 8) | head[3])


def to_plain_mode(img: Image.Image) -> Image.Image:
    """An image in a mode PIL can resize (RGB or L, CMYK kept for the caller's RGB conversion): palette and alpha
    become RGB (alpha dropped, as DALI drops it), 16- and 32-bit grayscale is scaled to 8 bits (PIL's own
    conversion clips it, which turns most of a 16-bit image white; DALI scales it)."""
    if img.mode in ("RGB", "L", "CMYK"):
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.uint32)
        return Image.fromarray(np.clip(wide >> 8, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")
