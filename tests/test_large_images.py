"""Photos as large as cameras make them: one decode's budget (dataset_tools/image_rules.py) keeps a real
100-megapixel JPEG on every backend and in `convert`, each decoding it within the budget, and refuses from the header
what cannot be bounded: a PNG bomb, a progressive JPEG (decoded whole) above the budget, and a header that claims
more pixels than its data can carry."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fastimagenet import loaders
from fastimagenet.dataset_tools.convert import load_rgb
from fastimagenet.dataset_tools.image_rules import DECODE_BUDGET
from fastimagenet.dataset_tools.scan import scan_image_folder
from fastimagenet.dataset_tools.synthetic_jpegs import make_jpeg_folder
from fastimagenet.dataset_tools.verify import cache_root, kept_samples
from fastimagenet.loaders import dali_loader
from tests.conftest import data_path, make_spec
from tests.test_bad_files import bomb_png
from tests.test_dali_loader import cuda_spec, dali_spec

ROOT = Path(__file__).resolve().parent.parent
SIDE = 10_000  # 100 megapixels, as a medium-format camera writes (11648 x 8736 is 102 MP)
BIG, PROGRESSIVE, LYING, BOMB = ("class_00/photo_100mp.jpg", "class_00/progressive_100mp.jpg",
                                 "class_01/claims_81mp.jpg", "class_01/bomb.png")


def photo(side: int) -> np.ndarray:
    """Smooth shading, edges and sensor-like noise: what a camera's JPEG encoder spends its bytes on."""
    y, x = np.mgrid[0:side:16, 0:side:16]
    coarse = np.stack([x % 256, y % 256, (x + y) // 3 % 256], axis=-1).astype(np.uint8)
    pixels = cv2.resize(coarse, (side, side), interpolation=cv2.INTER_LINEAR)
    return cv2.add(pixels, np.random.default_rng(0).integers(0, 12, pixels.shape, dtype=np.uint8))


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    """A small 2-class folder (8 images a class) plus the 100 MP JPEG, and the three files nobody may decode."""
    root = tmp_path_factory.mktemp("large") / "train"
    make_jpeg_folder(root, classes=2, per_class=8, size=64, seed=3)
    pixels = photo(SIDE)
    cv2.imwrite(str(root / BIG), pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    cv2.imwrite(str(root / PROGRESSIVE), pixels, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    header = bytearray(cv2.imencode(".jpg", pixels[:48, :64])[1].tobytes())  # SOF0 claims 9000 x 9000
    sof = header.index(b"\xff\xc0")
    header[sof + 5 : sof + 9] = struct.pack(">HH", 9000, 9000)
    (root / LYING).write_bytes(bytes(header))
    bomb_png(root / BOMB)
    return root


def test_the_100_megapixel_jpeg_is_kept_and_what_cannot_be_bounded_is_refused(large):
    kept = kept_samples(scan_image_folder(large), str(large), report=False)
    paths = [os.path.relpath(path, large) for path, _ in kept.samples]
    assert BIG in paths and kept.sizes[paths.index(BIG)] == (SIDE, SIDE)
    reason = {os.path.relpath(path, large): why for path, why in kept.skipped.items()}
    assert set(reason) == {PROGRESSIVE, LYING, BOMB}
    assert "progressive or multi-scan JPEG" in reason[PROGRESSIVE]
    assert "cannot hold them" in reason[LYING]
    assert "decompression bomb" in reason[BOMB].lower() and "refused before decoding" in reason[BOMB]


_PEAK_MEMORY = """
import sys
from fastimagenet.dataset_tools.convert import load_rgb
from fastimagenet.dataset_tools.verify import inspect_image
from fastimagenet.loaders.augment import center_crop_box
from fastimagenet.loaders.image_decode import _pil_crop, decode_crop
from PIL import Image
from tests.decode_memory import peak_growth, refused_everywhere

big, *refused = sys.argv[1:]

def keep_the_photo():
    assert inspect_image(big).problem is None
    assert load_rgb(big, 512).shape == (512, 512, 3)  # convert
    assert decode_crop(big, lambda w, h: (0, 0, w, h), 224, False).shape == (224, 224, 3)  # the largest crop
    assert decode_crop(big, lambda w, h: center_crop_box(w, h, 0.875), 224, False).shape == (224, 224, 3)  # eval
    with Image.open(big) as img:  # the PIL path (CMYK JPEGs take it)
        assert _pil_crop(img, (0, 0, img.width, img.height), 224, False).shape == (224, 224, 3)

def decode_the_photo_whole():
    with Image.open(big) as img:
        img.load()

print(peak_growth(lambda: [refused_everywhere(path) for path in refused]), peak_growth(keep_the_photo),
      peak_growth(decode_the_photo_whole))
"""


def test_every_decode_stays_within_the_budget(large):
    """In a fresh process: refusing the three files raises the peak memory by nothing, and verifying the 100 MP
    photo, converting it and decoding its largest crop through both decode paths by little; decoding it whole (as
    nothing here does) by its 286 MiB of pixels."""
    run = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(large / BIG), *(str(large / name) for name in
                                                                             (PROGRESSIVE, LYING, BOMB))],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    refused, kept, whole = map(int, run.stdout.split())
    assert refused < 8 and kept < 48 and whole > 286, (refused, kept, whole)


def test_convert_stores_it_within_the_budget_even_without_a_size_limit(large):
    """max_resolution 65535 asks for the photo as it is; one decode's budget still holds: 1/2 scale."""
    assert load_rgb(str(large / BIG), 65535).shape == (SIDE // 2, SIDE // 2, 3)


@pytest.mark.slow
def test_every_backend_trains_on_it_with_the_same_crops(large, tmp_path):
    """torchvision (region decode at 1/8), FFCV (from the .beton convert wrote) and DALI (from its reduced copy):
    the same samples in the same order, and each crop of the photo the same within resampling noise."""
    spec = dict(train=True, batch_size=6, resolution=32, seed=4)
    theirs = list(loaders.build_loader("torchvision", make_spec(large, **spec)))
    dali = loaders.build_loader("dali", dali_spec(large, **spec))
    copies = list((cache_root() / "reduced").glob("*.jpg"))
    assert len(copies) == 1 and Image.open(copies[0]).size == (SIDE // 2, SIDE // 2)
    assert (SIDE // 2) ** 2 <= DECODE_BUDGET
    ffcv = loaders.build_loader("ffcv", make_spec(data_path("ffcv", large, tmp_path), name="ffcv", **spec))
    # FFCV reads the photo as convert stored it (512 px, re-encoded) and decodes a 32 px crop of it at 1/8 scale:
    # on this image's steep synthetic gradients that alone differs by up to ~20 of 255 from a crop of the original
    # (measured: 19, against 6 for FFCV's whole decode of the same record); the others read the original.
    for loader, tolerance in ((dali, 10), (ffcv, 25)):
        ours = list(loader)
        assert [labels.tolist() for _, labels in ours] == [labels.tolist() for _, labels in theirs]
        for (a, _), (b, _) in zip(ours, theirs):
            assert (a.float() - b.float()).abs().mean(dim=(1, 2, 3)).max() < tolerance


@pytest.mark.slow
@pytest.mark.parametrize("train_split", [True, False])
def test_dali_sees_from_the_reduced_copy_what_it_sees_from_the_photo(large, monkeypatch, train_split):
    """DALI decoding the 100 MP original whole (what it would do without the copy: ~300 MB a decode) against DALI
    reading the copy: training crops and evaluation images differ by resampling noise only (mean absolute
    difference below 1 of 255)."""
    spec = dict(train=train_split, batch_size=6, resolution=32, seed=4)
    from_copy = list(loaders.build_loader("dali", dali_spec(large, **spec)))
    monkeypatch.setattr(dali_loader, "within_budget", lambda paths, sizes: (paths, sizes))
    from_photo = list(loaders.build_loader("dali", dali_spec(large, **spec)))
    assert sum(len(labels) for _, labels in from_copy) == (12 if train_split else 17)
    for (a, labels_a), (b, labels_b) in zip(from_copy, from_photo):
        assert torch.equal(labels_a, labels_b) and (a.float() - b.float()).abs().mean(dim=(1, 2, 3)).max() < 1


@pytest.mark.gpu
@pytest.mark.parametrize("train_split", [True, False])
def test_gpu_decode_reads_the_reduced_copy_too(large, train_split):
    """nvJPEG decodes the copy (25 MP: ~75 MB of device memory a decode instead of ~300 MB for the photo), and its
    batches are the CPU decoder's within decoder noise."""
    spec = dict(train=train_split, batch_size=6, resolution=32, seed=4)
    gpu = loaders.build_loader("dali", cuda_spec(large, **spec))
    cpu = loaders.build_loader("dali", dali_spec(large, **spec))
    for (on_gpu, gpu_labels), (on_cpu, cpu_labels) in zip(gpu, cpu):
        assert torch.equal(gpu_labels.cpu(), cpu_labels)
        assert (on_gpu.cpu().float() - on_cpu.float()).abs().mean() < 3
