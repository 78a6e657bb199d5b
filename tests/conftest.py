"""Shared fixtures: tiny JPEG datasets made on the spot, so tests need no download and run in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import fastimagenet
from fastimagenet import dataset_tools, loaders
from fastimagenet.cli import main
from fastimagenet.config import DataConfig
from fastimagenet.dataset_tools.synthetic_jpegs import make_jpeg_folder
from fastimagenet.loaders.base import LoaderSpec
from fastimagenet.loaders.options import LoaderConfig
from fastimagenet.metrics import read_metrics

torch.set_num_threads(2)

# The network of every end-to-end test: trains in seconds on 2 cores. Test files add their schedule settings.
TINY_RUN = ["model.arch=resnet10_small", "model.width=8", "runtime.compile=false", "runtime.device=cpu",
            "loader.workers=1", "data.scale=0.35,1"]
# A short run that learns the 4 classes of `jpeg_dataset` well above chance.
LEARNING_RUN = [*TINY_RUN, "optim.lr=0.8", "optim.label_smoothing=0", "schedule.lr=onecycle", "schedule.peak=0.2",
                "data.val_resolution=32"]


def train(loader, data, out_dir, *extra) -> list[dict]:
    """`fastimagenet train` on data/{train,val} with LEARNING_RUN + extra; returns metrics.jsonl's records."""
    args = ["train", "--loader", loader, f"data.train={data / 'train'}", f"data.val={data / 'val'}",
            f"runtime.out_dir={out_dir}", *LEARNING_RUN, *extra]
    assert main(args) == 0
    return read_metrics(out_dir)


# Dynamo settings a test (or the code it runs: runtime.compile_module) may change; restored after every test.
_DYNAMO_SETTINGS = ("recompile_limit", "accumulated_recompile_limit", "fail_on_recompile_limit_hit")


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path_factory, monkeypatch):
    """Every test gets its own image-verification cache (never ~/.cache) and leaves torch's global compile
    settings as it found them."""
    monkeypatch.setenv("FASTIMAGENET_CACHE", str(tmp_path_factory.mktemp("cache")))
    saved = {key: getattr(torch._dynamo.config, key) for key in _DYNAMO_SETTINGS}
    yield
    for key, value in saved.items():
        setattr(torch._dynamo.config, key, value)


def pytest_configure(config):
    """The checkout under test is the one imported: an editable install maps fastimagenet.loaders and
    fastimagenet.dataset_tools to the folders of the checkout it was made from, which need not be the checkout whose
    fastimagenet/ comes first on sys.path (the tests' root)."""
    checkout = Path(fastimagenet.__file__).parent.parent
    for package in (dataset_tools, loaders):
        if Path(package.__file__).parent.parent != checkout:
            raise pytest.UsageError(f"{package.__name__} comes from {Path(package.__file__).parent}, not from "
                                    f"{checkout}: the editable install is of another checkout; install this one "
                                    f"(pip install --no-deps -e {checkout}) or test the one installed")


def pytest_terminal_summary(terminalreporter, config):
    """The random order's seed, last, where a failure is read (`make test` is quiet, so pytest-randomly's own
    header line is not shown)."""
    if config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"test order: --randomly-seed={config.getoption('randomly_seed')} (pass it to "
                                    "pytest to run this order again; -p no:randomly for the file order)")


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


SHARDS = ":shards"  # a source name's suffix: the backend reading a sharded copy of the folder


def backend(source: str) -> str:
    """The loader backend of a source name ("torchvision", "dali:shards", ...)."""
    return source.removesuffix(SHARDS)


def data_path(name, folder, tmp_path):
    """What a backend reads for an ImageFolder `folder`: the folder itself, or a .beton converted from it; for a
    name ending in ":shards", a local sharded copy (folder order, 3 shards or so)."""
    if name.endswith(SHARDS):
        out = tmp_path / f"{folder.name}-shards"
        if not out.exists():
            assert main(["convert", str(folder), str(out), "--format", "shards", "--shard-order", "folder",
                         "--shard-size-mb", "0.04", "--workers", "2"]) == 0
        return out
    return loaders.data_from_folder(name, folder, tmp_path)


class PacedClock:
    """Stands in for the `time` module of fastimagenet.bench (which reads only perf_counter): it moves only when a
    pipeline wrapped by `pace` delivers a batch, by that pipeline's own seconds per batch. A benchmark's images/s
    are then known in advance: images per batch / seconds per batch."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def pace(self, pipeline, seconds_per_batch: float):
        return _Paced(pipeline, self, seconds_per_batch)


class _Paced:
    """A pipeline (loader or iterable) whose every batch advances a PacedClock; everything else is the pipeline's."""

    def __init__(self, inner, clock: PacedClock, seconds_per_batch: float):
        self.inner, self.clock, self.seconds_per_batch = inner, clock, seconds_per_batch

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            self.clock.now += self.seconds_per_batch
            yield batch


def make_spec(path, train=True, resolution=32, batch_size=4, workers=1, name="torchvision", **kwargs) -> LoaderSpec:
    return LoaderSpec(path=str(path), train=train, resolution=resolution, batch_size=batch_size,
                      device=torch.device("cpu"), augment=DataConfig(),
                      options=LoaderConfig(name=backend(name), workers=workers),
                      **kwargs)

