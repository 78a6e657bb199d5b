"""JPEG decoding of the torchvision backend: the region-of-interest decoder against a whole decode, its errors, and a
quality guard that keeps speed work from lowering what the model sees."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
from PIL import Image

from fastimagenet.config import DataConfig
from fastimagenet.dataset_tools.synthetic_jpegs import _image as photo_like
from fastimagenet.loaders._jpeg_roi import Error as JpegError, decode_region
from fastimagenet.loaders.augment import center_crop_box, crop_boxes, crop_uniforms
from fastimagenet.loaders.image_decode import UnreadableImage, decode_crop

# (width, height, PIL save options, mode): the layouts libjpeg decodes differently
ENCODINGS = {
    "baseline 4:2:0": (427, 353, {}, "RGB"),
    "progressive": (427, 353, {"progressive": True}, "RGB"),
    "gray": (427, 353, {}, "L"),
    "4:4:4": (427, 353, {"subsampling": 0}, "RGB"),
    "4:2:2": (427, 353, {"subsampling": 1}, "RGB"),
    "restart markers": (427, 353, {"restart_marker_blocks": 1}, "RGB"),
    "odd size, progressive": (333, 251, {"progressive": True}, "RGB"),
}


def _jpeg(width: int, height: int, options: dict, mode: str = "RGB", seed: int = 0) -> bytes:
    out = io.BytesIO()
    Image.fromarray(photo_like(np.random.default_rng(seed), 3, 10, width, height)).convert(mode).save(
        out, "JPEG", quality=90, **options)
    return out.getvalue()


def _whole_decode(data: bytes, scale: int) -> np.ndarray:
    """The whole image at 1/scale through PIL's libjpeg (draft picks the DCT scale)."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft(img.mode, (img.width // scale, img.height // scale))
        return np.asarray(img.convert("RGB"))


def _boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Whole image, the four corners, one-pixel crops at the edges, crops starting on and beside iMCU (16 px)
    boundaries, and random ones."""
    rng = random.Random(width * height)
    boxes = [(0, 0, width, height), (0, 0, 5, 7), (width - 9, 0, width, 11), (0, height - 3, 13, height),
             (width - 1, height - 1, width, height), (width - 1, 0, width, height), (16, 16, 17, 40),
             (15, 31, 48, 33), (17, 1, 64, height)]
    for _ in range(12):
        left, top = rng.randrange(width), rng.randrange(height)
        boxes.append((left, top, rng.randrange(left + 1, width + 1), rng.randrange(top + 1, height + 1)))
    return [box for box in boxes if box[2] <= width and box[3] <= height]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_region_decode_gives_the_pixels_of_a_whole_decode(encoding, scale):
    width, height, options, mode = ENCODINGS[encoding]
    data = _jpeg(width, height, options, mode)
    whole = _whole_decode(data, scale)
    for left, top, right, bottom in _boxes(*whole.shape[1::-1]):
        pixels, stride, rows, x_offset = decode_region(data, scale, left, top, right, bottom)
        region = np.frombuffer(pixels, np.uint8).reshape(rows, stride, 3)[:, x_offset:x_offset + right - left]
        expected = whole[top:bottom, left:right]
        assert region.shape == expected.shape
        # the same libjpeg arithmetic; 1 level of slack for another libjpeg-turbo version in PIL's wheel
        assert np.abs(region.astype(int) - expected).max() <= 1, (left, top, right, bottom)


def test_a_box_outside_the_image_is_clamped_to_it():
    data = _jpeg(64, 48, {})
    pixels, stride, rows, x_offset = decode_region(data, 1, -5, -5, 1000, 1000)
    assert (rows, stride, x_offset) == (48, 64, 0) and len(pixels) == 48 * 64 * 3


def _corrupt_huffman_table(data: bytes) -> bytes:
    """The first DHT segment claims more codes than it holds: libjpeg stops with an error (not a warning), while
    PIL, which reads only the frame header, still opens the file."""
    dht = data.index(b"\xff\xc4")
    return data[:dht + 5] + b"\xff" * 16 + data[dht + 21:]


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"\xff\xd8" + b"\x00" * 64, "Not a JPEG file|no image"),
    (lambda data: data.replace(b"\xff\xc0\x00\x11\x08", b"\xff\xc0\x00\x11\x0c"), "precision"),  # 12-bit
    (_corrupt_huffman_table, "Huffman"),
])
def test_libjpeg_errors_are_exceptions_not_an_exit(damage, message):
    with pytest.raises(JpegError, match=message):
        decode_region(damage(_jpeg(64, 48, {})), 1, 0, 0, 64, 48)


def test_decode_errors_are_unreadable_images(tmp_path):
    data = _jpeg(64, 48, {})
    cases = {"bad_table.jpg": _corrupt_huffman_table(data), "truncated.jpg": data[: len(data) // 2]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UnreadableImage):
            decode_crop(str(tmp_path / name), lambda w, h: (0, 0, w, h), 32, flip=False)


# Quality guard. The reference is what a careful pipeline makes of the same box: the whole image decoded at full
# size and resized with Lanczos. PSNR from it on these images and boxes (BENCHMARKS.md, quality of the resize), mean
# over the crops at 128 / 176 / 224 px: the backend 40.97 / 43.98 / 43.80 dB; the plain torchvision pipeline (PIL,
# bilinear with antialiasing) 40.57 / 43.42 / 43.74; a bilinear resize of every crop (no area average above a 1.5x
# shrink) 40.39 / 42.35 / 43.07. The floors sit 0.3 dB under the backend's figures. The lowest single crop (31.6 dB at
# 128 px) is the whole 1280x960 image squeezed to a square, where every antialiasing filter is far from Lanczos.
MEAN_FLOOR_DB = {128: 40.6, 176: 43.6, 224: 43.5}
FLOOR_DB = 31.0


def _psnr(image: np.ndarray, reference: np.ndarray) -> float:
    return 10 * math.log10(255**2 / np.mean((image.astype(float) - reference) ** 2))


@pytest.mark.parametrize("size", [128, 176, 224])
def test_crops_stay_close_to_a_high_quality_reference(tmp_path, size):
    figures = []
    # photo-sized images, and a large one whose crops go through 1/2 and 1/4 DCT scaling
    for seed, (width, height) in enumerate([(427, 353), (333, 498), (1280, 960)]):
        path = tmp_path / f"{seed}.jpg"
        path.write_bytes(_jpeg(width, height, {}, seed=seed))
        with Image.open(path) as img:
            whole = img.convert("RGB")
        # boxes on the 1/8 grid, so every DCT scale decodes exactly the box and the figure is the resize's alone
        boxes = crop_boxes(crop_uniforms(range(12), seed=size, epoch=0), np.tile([width, height], (12, 1)),
                           DataConfig()).tolist()
        boxes += [center_crop_box(width, height, 0.875), (0, 0, width, height)]
        for box in boxes:
            box = tuple(8 * (c // 8) for c in box)
            reference = np.asarray(whole.resize((size, size), Image.LANCZOS, box=box)).astype(float)
            figures.append(_psnr(decode_crop(str(path), lambda w, h: box, size, flip=False), reference))
    assert min(figures) >= FLOOR_DB and np.mean(figures) >= MEAN_FLOOR_DB[size], (min(figures), np.mean(figures))


# A checkout whose C extension was never built (a stock GPU container without a compiler): the import of the
# region decoder fails, as it would there.
_WITHOUT_THE_EXTENSION = """
import sys
sys.modules["fastimagenet.loaders._jpeg_roi"] = None  # import fails with ImportError
from fastimagenet.loaders.image_decode import decode_crop
image = decode_crop(sys.argv[1], lambda w, h: (0, 0, w, h), 16, flip=False)
print(image.shape, image.dtype)
"""


def test_without_the_built_region_decoder_jpegs_decode_through_pil_with_a_notice(tmp_path):
    import subprocess
    import sys

    from tests.processes import ROOT

    path = tmp_path / "a.jpg"
    Image.fromarray(photo_like(np.random.default_rng(0), 1, 4, 64, 48)).save(path, quality=90)
    done = subprocess.run([sys.executable, "-c", _WITHOUT_THE_EXTENSION, str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "(16, 16, 3) uint8"
    assert "notice: the JPEG region decoder (loaders/_jpeg_roi.c) is not built" in done.stderr
