"""The Loader protocol, checked the same way for every backend."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fastimagenet import loaders
from tests.conftest import SHARDS, backend, data_path, make_spec

# Every registered backend, and those that read sharded datasets on a local sharded copy; those that read labelled
# data are checked for content too (`synthetic` makes up random images and is checked for shape only).
SHARD_SOURCES = [f"torchvision{SHARDS}", f"dali{SHARDS}"]
DATA_BACKENDS = [name for name in loaders.NAMES if loaders.reads(backend(name))] + SHARD_SOURCES
SOURCES = list(loaders.NAMES) + SHARD_SOURCES


def labels_of(loader) -> list[int]:
    return [int(v) for _, labels in loader for v in labels]


@pytest.mark.parametrize("name", SOURCES)
def test_batches_are_uint8_channels_last_and_reconfigure_changes_shape(name, jpeg_dataset, tmp_path):
    spec = make_spec(data_path(name, jpeg_dataset / "train", tmp_path), name=name, resolution=32, batch_size=8,
                     num_classes=4)
    loader = loaders.build_loader(backend(name), spec)
    assert len(loader.classes) == 4
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    images, labels = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    assert 0 <= int(labels.min()) and int(labels.max()) < 4

    loader.reconfigure(48, 16)  # takes effect from the next pass
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 48, 48) and labels.shape == (16,)
    assert len(loader) == 96 // 16 if loaders.reads(backend(name)) else len(loader) == 4096 // 16


@pytest.mark.parametrize("name", DATA_BACKENDS)
def test_order_is_deterministic_per_epoch(name, jpeg_dataset, tmp_path):
    path = data_path(name, jpeg_dataset / "train", tmp_path)
    first = loaders.build_loader(backend(name), make_spec(path, name=name, seed=3))
    second = loaders.build_loader(backend(name), make_spec(path, name=name, seed=3))
    first.set_epoch(1)
    second.set_epoch(1)
    epoch1 = labels_of(first)
    assert epoch1 == labels_of(second)
    first.set_epoch(2)
    assert labels_of(first) != epoch1
    assert sorted(labels_of(first)) == sorted(epoch1)  # every sample once (96 divides by 4)


@pytest.mark.parametrize("name", DATA_BACKENDS)
def test_val_yields_every_sample_once_in_order(name, jpeg_dataset, tmp_path):
    path = data_path(name, jpeg_dataset / "val", tmp_path)
    loader = loaders.build_loader(backend(name), make_spec(path, name=name, train=False, batch_size=5))
    labels = labels_of(loader)
    assert labels == sorted(labels) and len(labels) == 32  # 32 = 6 full batches + 2
    assert len(loader) == 7


@pytest.mark.parametrize("name", DATA_BACKENDS)
def test_ranks_get_disjoint_shards_that_cover_the_data(name, one_per_class, tmp_path):
    path = data_path(name, one_per_class, tmp_path)
    seen = []
    for rank in range(2):
        loader = loaders.build_loader(backend(name), make_spec(path, name=name, batch_size=8, rank=rank, world_size=2))
        loader.set_epoch(5)
        seen.append(labels_of(loader))
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(16))


@pytest.fixture
def exif_rotated(tmp_path):
    """Two classes of one non-square JPEG whose EXIF says "rotate 90° clockwise to view" (Orientation=6). Stored
    pixels: red top half, blue bottom half; a backend that applied the rotation would put them side by side."""
    root = tmp_path / "exif"
    for label in range(2):
        (root / f"c{label}").mkdir(parents=True)
        image = Image.new("RGB", (96, 64), (20, 40, 230))
        image.paste((230, 30, 20), (0, 0, 96, 32))
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation
        image.save(root / f"c{label}" / "rotated.jpg", quality=95, exif=exif)
    return root


def test_exif_orientation_is_ignored_by_every_backend(exif_rotated, tmp_path):
    """torchvision's ImageFolder semantics: the stored pixels, whatever the EXIF orientation says."""
    outputs = {}
    for name in DATA_BACKENDS:
        spec = make_spec(data_path(name, exif_rotated, tmp_path), name=name, train=False, batch_size=2,
                         resolution=32)
        (images, _), = list(loaders.build_loader(backend(name), spec))
        outputs[name] = images.float()
    reference = outputs["torchvision"]
    assert reference.shape == (2, 3, 32, 32)
    top, bottom = reference[:, :, :12].mean(dim=(0, 2, 3)), reference[:, :, -12:].mean(dim=(0, 2, 3))
    assert top[0] > 200 > bottom[0] and bottom[2] > 200 > top[2]  # red above blue, as stored
    for name, images in outputs.items():
        assert images.shape == reference.shape, name
        assert (images - reference).abs().mean() < 4, name  # same pixels within JPEG and resize tolerance


@pytest.mark.parametrize("name", SOURCES)
def test_a_resumed_epoch_yields_the_rest_of_the_same_epoch(name, jpeg_dataset, tmp_path):
    """set_epoch(epoch, first_step): the batches an uninterrupted pass yields from first_step on — the same
    samples on every backend, and the same pixels where crops are drawn per sample (all but FFCV, which draws its
    own)."""
    path = data_path(name, jpeg_dataset / "train", tmp_path)
    loader = loaders.build_loader(backend(name), make_spec(path, name=name, seed=4, batch_size=8, num_classes=4))
    loader.set_epoch(3)
    whole = [(images.clone(), labels.clone()) for images, labels in loader]
    loader.set_epoch(3, first_step=5)
    rest = [(images.clone(), labels.clone()) for images, labels in loader]
    assert len(loader) == len(whole) and len(rest) == len(whole) - 5
    assert [labels.tolist() for _, labels in rest] == [labels.tolist() for _, labels in whole[5:]]
    if name != "ffcv":
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(rest, whole[5:]))
    loader.set_epoch(3)  # and a plain set_epoch starts from the beginning again
    assert sum(1 for _ in loader) == len(whole)
