"""Shared fixtures: tiny JPEG datasets made on the spot, so tests need no download and run in seconds."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from dataset_tools.synthetic_jpegs import make_jpeg_folder
from fastimagenet.config import LoaderConfig
from loaders.augment import Augment
from loaders.base import LoaderSpec

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def jpeg_dataset(tmp_path_factory):
    """root/{train,val}/class_XX/*.jpg: 4 learnable classes of ~64 px JPEGs."""
    root = tmp_path_factory.mktemp("jpegs")
    make_jpeg_folder(root / "train", classes=4, per_class=24, size=64, seed=0)
    make_jpeg_folder(root / "val", classes=4, per_class=8, size=64, seed=1)
    return root


@pytest.fixture(scope="session")
def one_per_class(tmp_path_factory):
    """16 classes of exactly one image: a label names its sample, which makes sharding checks exact."""
    root = tmp_path_factory.mktemp("one_per_class")
    make_jpeg_folder(root, classes=16, per_class=1, size=48, seed=2)
    return root


@pytest.fixture
def folder_with_bad_files(jpeg_dataset, tmp_path):
    """The train split plus the bad files ImageNet-like data has: truncated, not an image, a GIF named .jpg (PIL
    reads it, DALI does not), and a non-image file."""
    root = tmp_path / "train"
    shutil.copytree(jpeg_dataset / "train", root)
    good = next((root / "class_00").glob("*.jpg")).read_bytes()
    (root / "class_00" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "class_01" / "not_really.jpg").write_bytes(b"this is text, not a JPEG")
    Image.new("RGB", (40, 40)).save(root / "class_02" / "a_gif.jpg", format="GIF")
    (root / "class_02" / "notes.txt").write_text("not an image")
    return root


def make_spec(path, train=True, resolution=32, batch_size=4, workers=1, name="torchvision", **kwargs) -> LoaderSpec:
    return LoaderSpec(path=str(path), train=train, resolution=resolution, batch_size=batch_size,
                      device=torch.device("cpu"), augment=Augment(), options=LoaderConfig(name=name, workers=workers),
                      **kwargs)
