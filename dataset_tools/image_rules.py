"""The one rule for which image files a dataset keeps, shared by every backend and by `convert`.

A file is kept by every backend or reported by every backend: dataset_tools/verify.py applies `header_problem` and
a decode to each file before any loader (or `convert`) uses it, and the decoders check the header again in case a
file changed since. Kept formats are those that PIL (torchvision backend, convert) and DALI (CPU and GPU) both
decode; GIF (animated or not) and JPEG 2000 are not among them. Images above MAX_PIXELS are refused from their
header, before a single pixel is allocated: a small PNG can claim 900 megapixels (a decompression bomb) and a
JPEG header can claim 65000 x 65000.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

KEPT_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP"})  # as PIL names the formats

# PIL's own warning threshold (~89.5 MP; it refuses only above twice that, and a user may switch it off). The
# largest ImageNet photo is far below it; one RGB image at the limit decodes to ~256 MiB.
MAX_PIXELS = 89_478_485

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
    if width * height > MAX_PIXELS:
        return (f"{width}x{height} = {width * height / 1e6:,.0f} megapixels is above the {MAX_PIXELS / 1e6:.1f} MP "
                "limit (a decompression bomb or a damaged header); refused before decoding")
    return None


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
