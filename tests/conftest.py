"""Shared fixtures: tiny JPEG datasets made on the spot, so tests need no download and run in seconds."""

from __future__ import annotations

import pytest
import torch

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


def make_spec(path, train=True, resolution=32, batch_size=4, workers=1, name="torchvision", **kwargs) -> LoaderSpec:
    return LoaderSpec(path=str(path), train=train, resolution=resolution, batch_size=batch_size,
                      device=torch.device("cpu"), augment=Augment(), options=LoaderConfig(name=name, workers=workers),
                      **kwargs)
