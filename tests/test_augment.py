"""The training augmentation every backend applies (loaders/augment.py): the crop rule's bounds and its fallback, and
the data.* settings as every backend reads them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from fastimagenet import loaders
from fastimagenet.config import DataConfig
from fastimagenet.loaders.augment import TrainCrops, crop_boxes, crop_uniforms, crop_windows, pixel_windows
from tests.conftest import data_path, make_spec


def test_random_crops_keep_to_the_area_and_aspect_bounds_and_span_them():
    aug = DataConfig(scale=(0.2, 0.5), ratio=(0.75, 4 / 3))
    boxes = crop_boxes(crop_uniforms(range(500), seed=0, epoch=0), np.tile([100, 80], (500, 1)), aug)
    left, top, right, bottom = boxes.T
    assert (0 <= left).all() and (left < right).all() and (right <= 100).all()
    assert (0 <= top).all() and (top < bottom).all() and (bottom <= 80).all()
    areas, aspects = (right - left) * (bottom - top) / (100 * 80), (right - left) / (bottom - top)
    assert 0.2 <= areas.min() < 0.21 and 0.49 < areas.max() <= 0.5
    assert 0.75 <= aspects.min() < 0.77 and 1.31 < aspects.max() <= 4 / 3


@pytest.mark.parametrize("width, height, expected", [
    (300, 100, ((300 - 400 / 3) / 2, 0, (300 + 400 / 3) / 2, 100)),  # too wide: the widest crop of aspect 4/3
    (100, 300, (0, (300 - 400 / 3) / 2, 100, (300 + 400 / 3) / 2)),  # too tall: the tallest of aspect 3/4
    (100, 100, (0, 0, 100, 100)),  # within the bounds: the whole image
])
def test_when_ten_draws_miss_the_crop_is_the_largest_centred_one_within_the_aspect_bounds(width, height, expected):
    """The whole area at an aspect drawn from [3/4, 4/3] fits in none of these images (a square only at exactly 1):
    every draw misses."""
    aug = DataConfig(scale=(1.0, 1.0), ratio=(0.75, 4 / 3))
    [box] = crop_boxes(crop_uniforms([7], seed=0, epoch=0), np.array([(width, height)]), aug)
    assert tuple(box) == pytest.approx(expected)


def test_the_randomness_is_uniform_independent_and_keyed_by_seed_epoch_and_index():
    """Counter-based draws: each column uniform on [0, 1), columns and neighbouring samples uncorrelated, and any
    change of seed, epoch or index gives other draws (the same key always the same ones)."""
    draws = crop_uniforms(range(100_000), seed=3, epoch=1)
    assert draws.shape == (100_000, 23) and 0 <= draws.min() and draws.max() < 1
    assert np.abs(draws.mean(axis=0) - 0.5).max() < 0.005
    assert np.abs(np.histogram(draws[:, 5], bins=10, range=(0, 1))[0] / 10_000 - 1).max() < 0.05
    correlations = np.corrcoef(np.concatenate([draws[:-1], draws[1:, :3]], axis=1).T)
    assert np.abs(correlations - np.eye(26))[:23].max() < 0.02
    same = crop_uniforms([5, 9], seed=3, epoch=1)
    assert np.array_equal(same, draws[[5, 9]])
    for other in (crop_uniforms([5, 9], seed=4, epoch=1), crop_uniforms([5, 9], seed=3, epoch=2),
                  crop_uniforms([6, 10], seed=3, epoch=1)):
        assert not np.isclose(other, same).any()


def test_a_batch_drawn_at_once_gives_each_sample_its_own_crop_and_a_changed_size_its_box_for_that_size():
    """TrainCrops (the torchvision workers') and crop_windows (the DALI and FFCV feeders') agree with a sample drawn
    alone, whatever batch it is drawn in."""
    aug, sizes = DataConfig(), np.array([(300, 200), (120, 400), (640, 480), (50, 60)])
    crops = TrainCrops([2, 0, 3], sizes, seed=1, epoch=4, aug=aug)
    windows = crop_windows([2, 0, 3], sizes, seed=1, epoch=4, aug=aug)
    for k, index in enumerate([2, 0, 3]):
        alone = TrainCrops([index], sizes, seed=1, epoch=4, aug=aug)
        assert crops.box_of(k)(*sizes[index]) == alone.box_of(0)(*sizes[index])
        assert crops.flips[k] == alone.flips[0] == bool(windows[k, 4])
        assert list(windows[k, :4]) == list(pixel_windows(np.array([crops.box_of(k)(*sizes[index])]))[0])
    resized = crops.box_of(0)(320, 240)  # the file was replaced by one of half the size: same draw, its own box
    assert resized == pytest.approx(tuple(c / 2 for c in crops.box_of(0)(640, 480)))


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
