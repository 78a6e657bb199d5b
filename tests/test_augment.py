"""The training augmentation every backend applies (loaders/augment.py): the crop rule's bounds and its fallback, and
the data.* settings as every backend reads them."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

import loaders
from fastimagenet.config import DataConfig
from loaders.augment import random_resized_crop_box
from tests.conftest import data_path, make_spec


def test_random_crops_keep_to_the_area_and_aspect_bounds_and_span_them():
    aug = DataConfig(scale=(0.2, 0.5), ratio=(0.75, 4 / 3))
    rng = random.Random(0)
    areas, aspects = [], []
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_box(100, 80, aug, rng)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 80
        areas.append((right - left) * (bottom - top) / (100 * 80))
        aspects.append((right - left) / (bottom - top))
    assert 0.2 <= min(areas) < 0.21 and 0.49 < max(areas) <= 0.5
    assert 0.75 <= min(aspects) < 0.77 and 1.31 < max(aspects) <= 4 / 3


@pytest.mark.parametrize("width, height, expected", [
    (300, 100, ((300 - 400 / 3) / 2, 0, (300 + 400 / 3) / 2, 100)),  # too wide: the widest crop of aspect 4/3
    (100, 300, (0, (300 - 400 / 3) / 2, 100, (300 + 400 / 3) / 2)),  # too tall: the tallest of aspect 3/4
    (100, 100, (0, 0, 100, 100)),  # within the bounds: the whole image
])
def test_when_ten_draws_miss_the_crop_is_the_largest_centred_one_within_the_aspect_bounds(width, height, expected):
    """The whole area at an aspect drawn from [3/4, 4/3] fits in none of these images (a square only at exactly 1):
    every draw misses."""
    aug = DataConfig(scale=(1.0, 1.0), ratio=(0.75, 4 / 3))
    assert random_resized_crop_box(width, height, aug, random.Random(0)) == pytest.approx(expected)


def ramps(side: int) -> np.ndarray:
    """A square image whose red rises from left to right and green from top to bottom (at pixel centres): any other
    crop, or a mirror, shows."""
    ramp = 255 * (np.arange(side) + 0.5) / side
    pixels = np.full((side, side, 3), 90.0)
    pixels[..., 0], pixels[..., 1] = ramp[None, :], ramp[:, None]
    return pixels


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """8 square JPEGs of `ramps`, one class, sides 36 to 50 px."""
    root = tmp_path_factory.mktemp("squares")
    (root / "a").mkdir()
    for i, side in enumerate(range(36, 52, 2)):
        Image.fromarray(ramps(side).round().astype(np.uint8)).save(root / "a" / f"{i}.jpg", quality=95)
    return root


@pytest.mark.parametrize("name", ["torchvision", "dali", "ffcv"])
def test_a_whole_image_crop_is_the_image_on_every_backend_and_flip_false_never_mirrors(name, squares, tmp_path):
    """data.scale=1,1 and data.ratio=1,1 make every backend's box the whole (square) image: each training image is
    then the source resized, mirrored in about half the samples, and in none with data.flip=false."""
    reference = torch.from_numpy(ramps(32)).permute(2, 0, 1).float()
    path = data_path(name, squares, tmp_path)

    def mirrored(flip: bool) -> list[bool]:
        augment = DataConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=flip)
        loader = loaders.build_loader(name, dataclasses.replace(make_spec(path, name=name, batch_size=8),
                                                                augment=augment))
        answers = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            for images, _ in loader:
                for image in images.float():
                    plain, mirror = ((image - target).abs().mean() for target in (reference, reference.flip(2)))
                    assert min(plain, mirror) < 4, name  # the image, within JPEG and resize tolerance
                    answers.append(bool(mirror < plain))
        return answers

    assert not any(mirrored(False))
    assert 0 < sum(mirrored(True)) < 24  # all 24 alike: a chance of 2 in 2**24
