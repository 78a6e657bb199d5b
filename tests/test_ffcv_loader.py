"""The ffcv backend beyond the shared contract: per-epoch reconfiguration, orders, pixels, errors, a run that learns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import loaders
from dataset_tools.convert import ConvertOptions, convert, convert_folder, load_rgb
from fastimagenet.bench import bench_loader
from fastimagenet.config import DataConfig, FfcvOptions, LoaderConfig
from fastimagenet.errors import UserError
from tests.conftest import make_spec, train


@pytest.fixture(scope="module")
def betons(jpeg_dataset, tmp_path_factory):
    """jpeg_dataset as out/{train,val}.beton (and the sidecars)."""
    out = tmp_path_factory.mktemp("betons")
    convert(jpeg_dataset, out, ConvertOptions(workers=2))
    return out


def ffcv_spec(path, **kwargs):
    return make_spec(path, name="ffcv", **kwargs)


def test_reconfigure_reshapes_every_batch_of_the_next_epoch(betons):
    loader = loaders.build_loader("ffcv", ffcv_spec(betons / "train.beton", resolution=24, batch_size=8))
    assert {tuple(images.shape) for images, _ in loader} == {(8, 3, 24, 24)} and len(loader) == 12
    loader.reconfigure(40, 32)
    loader.set_epoch(1)
    shapes = [(tuple(images.shape), tuple(labels.shape)) for images, labels in loader]
    assert shapes == [((32, 3, 40, 40), (32,))] * 3 and len(loader) == 3
    with pytest.raises(UserError, match="larger than the 96 samples"):
        loader.reconfigure(40, 128)


def test_quasi_random_order_is_deterministic_and_covers_every_sample(betons):
    options = LoaderConfig(name="ffcv", workers=1, ffcv=FfcvOptions(order="quasi_random", os_cache=True))
    orders = []
    for rank in range(2):
        spec = dataclasses.replace(ffcv_spec(betons / "train.beton", rank=rank, world_size=2), options=options)
        loader = loaders.build_loader("ffcv", spec)
        loader.set_epoch(3)
        orders.append(loader._loader.traversal_order.sample_order(3).tolist())
        assert orders[-1] == loader._loader.traversal_order.sample_order(3).tolist()
        assert sum(labels.shape[0] for _, labels in loader) == 48
    assert sorted(orders[0] + orders[1]) == list(range(96))


def test_val_pixels_match_the_source_images(one_per_class, tmp_path):
    """Centre crop with crop_ratio 1 at the image's own size is the whole image: the decoded batch is the file."""
    beton = convert_folder(one_per_class, tmp_path / "v.beton", write_mode="raw", workers=1)
    spec = dataclasses.replace(ffcv_spec(beton, train=False, resolution=36, batch_size=16),
                               augment=DataConfig(crop_ratio=1.0))
    images, labels = next(iter(loaders.build_loader("ffcv", spec)))
    assert labels.tolist() == list(range(16))
    for image, path in zip(images, sorted(one_per_class.glob("*/*"))):
        source = load_rgb(str(path), 512)
        side = min(source.shape[:2])
        top, left = (source.shape[0] - side) // 2, (source.shape[1] - side) // 2
        square = source[top : top + side, left : left + side]
        if side == 36:  # images of other sizes are resampled; those of this side must match exactly
            assert np.array_equal(image.permute(1, 2, 0).numpy(), square)


def test_a_folder_or_a_file_without_sidecar_is_a_clear_error(jpeg_dataset, betons, tmp_path):
    with pytest.raises(UserError, match="reads a .beton file, not a folder.*fastimagenet convert"):
        loaders.build_loader("ffcv", ffcv_spec(jpeg_dataset / "train"))
    orphan = tmp_path / "orphan.beton"
    orphan.write_bytes((betons / "train.beton").read_bytes())
    with pytest.raises(UserError, match="orphan.beton.json: missing"):
        loaders.build_loader("ffcv", ffcv_spec(orphan))


def test_val_classes_must_match_the_train_split(betons):
    with pytest.raises(UserError, match="classes differ from the train split"):
        loaders.build_loader("ffcv", ffcv_spec(betons / "val.beton", train=False, classes=["x", "y"]))


def test_bench_times_the_loader_against_raw_ffcv(betons):
    result = bench_loader("ffcv", str(betons / "train.beton"), 32, 16, 1, "cpu", ["raw"])
    assert result["images_per_s"] > 0 and result["raw_images_per_s"] > 0


def test_tiny_ffcv_run_learns_with_two_resolutions_and_batch_sizes(betons, tmp_path):
    out = tmp_path / "run"
    # the shared tiny-model settings of the training tests; the later data.* overrides point them at the files
    metrics = train("ffcv", betons, out, "epochs=5", "schedule.stages=0,24,16;2,32,8",
                    f"data.train={betons / 'train.beton'}", f"data.val={betons / 'val.beton'}")
    assert [m["resolution"] for m in metrics] == [24, 24, 32, 32, 32]
    assert [m["batch_size"] for m in metrics] == [16, 16, 8, 8, 8]
    assert metrics[-1]["val_top1"] >= 0.6  # 4 classes: chance is 0.25
