"""The built-in demo dataset and the `demo` command."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools.fashion_mnist import CLASSES, DEBIAN_DIR, prepare_fashion_mnist


def _write_idx(path, array, magic):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape) + array.tobytes())


@pytest.fixture
def tiny_source(tmp_path):
    """Fashion-MNIST-format files with 20 train and 10 val images."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 20), ("t10k", 10)):
        _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (count, 28, 28), np.uint8), 2051)
        _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count, dtype=np.uint8) % 10, 2049)
    return src


def test_idx_files_become_an_image_folder(tiny_source, tmp_path):
    out = prepare_fashion_mnist(tmp_path / "fm", source=tiny_source)
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(CLASSES)
    assert len(list((out / "train").glob("*/*.jpg"))) == 20 and len(list((out / "val").glob("*/*.jpg"))) == 10
    with Image.open(out / "train" / CLASSES[3] / "00003.jpg") as img:
        assert img.size == (28, 28) and img.mode == "L"
    stamp_time = (out / ".complete").stat().st_mtime
    prepare_fashion_mnist(tmp_path / "fm", source=tiny_source)  # cached: not rewritten
    assert (out / ".complete").stat().st_mtime == stamp_time


def test_interrupted_preparation_is_redone(tiny_source, tmp_path):
    (tmp_path / "fm" / "train").mkdir(parents=True)  # a half-written tree without the stamp
    out = prepare_fashion_mnist(tmp_path / "fm", source=tiny_source)
    assert len(list((out / "train").glob("*/*.jpg"))) == 20


def test_bad_sources_have_clear_errors(tiny_source, tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "a", source=tmp_path / "missing")
    (tiny_source / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x09\x99" + bytes(8)))
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz: not an idx file"):
        prepare_fashion_mnist(tmp_path / "b", source=tiny_source)
    _write_idx(tiny_source / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8), 2049)  # 11 labels, 20 images
    with pytest.raises(UserError, match=r"train holds \(20, 28, 28\) images and 11 labels"):
        prepare_fashion_mnist(tmp_path / "c", source=tiny_source)


@pytest.mark.slow  # FFCV's writer start-up and its JIT: ~15 s
def test_idx_files_become_betons_of_the_exact_pixels(tiny_source, tmp_path, capsys):
    from fastimagenet.dataset_tools.beton_file import Beton
    from fastimagenet.dataset_tools.fashion_mnist import _read_idx, fashion_mnist_betons
    from fastimagenet.dataset_tools.inspect_beton import inspect_beton

    train, val = fashion_mnist_betons(tmp_path / "fm", source=tiny_source)
    assert "writing Fashion-MNIST" in capsys.readouterr().out
    for path, prefix, count in ((train, "train", 20), (val, "t10k", 10)):
        info = inspect_beton(path, verify=True)
        assert info["verified"] and info["write_modes"] == {"raw": count} and info["class_names"][0] == CLASSES[0]
        beton = Beton(path)
        pixels = _read_idx(tiny_source / f"{prefix}-images-idx3-ubyte.gz", 2051)
        labels = _read_idx(tiny_source / f"{prefix}-labels-idx1-ubyte.gz", 2049)
        for i in (0, count - 1):
            image = beton.pixels(i)
            assert beton.labels[i] == labels[i] and image.shape == (28, 28, 3)
            assert all(np.array_equal(image[:, :, c], pixels[i]) for c in range(3))
    stamp = val.stat().st_mtime_ns
    assert fashion_mnist_betons(tmp_path / "fm", source=tiny_source) == (train, val)  # cached: not rewritten
    assert val.stat().st_mtime_ns == stamp and capsys.readouterr().out == ""


@pytest.fixture
def tiny_demo_data(tiny_source, tmp_path, monkeypatch):
    """`make-data fashion-mnist` and `demo` read tiny_source, and the demo keeps its data under tmp_path."""
    from fastimagenet import cli
    from fastimagenet.dataset_tools import fashion_mnist

    prepare, betons = fashion_mnist.prepare_fashion_mnist, fashion_mnist.fashion_mnist_betons
    monkeypatch.setattr(fashion_mnist, "prepare_fashion_mnist", lambda out: prepare(out, source=tiny_source))
    monkeypatch.setattr(fashion_mnist, "fashion_mnist_betons", lambda out: betons(out, source=tiny_source))
    monkeypatch.setattr(cli, "DATA_HOME", tmp_path / "home")


def test_make_data_fashion_mnist_writes_the_folders_it_prints(tiny_demo_data, tmp_path, capsys):
    from fastimagenet.cli import main

    assert main(["make-data", "fashion-mnist", str(tmp_path / "fm")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "fm")
    for split, count in (("train", 20), ("val", 10)):
        assert sorted(p.name for p in (tmp_path / "fm" / split).iterdir()) == sorted(CLASSES)
        assert len(list((tmp_path / "fm" / split).glob("*/*.jpg"))) == count


@pytest.mark.parametrize("loader", ["torchvision", "synthetic", "dali",
                                    pytest.param("ffcv", marks=pytest.mark.slow)])  # convert + FFCV's JIT: ~25 s
def test_demo_trains_with_every_loader(loader, tiny_demo_data, tmp_path, capsys):
    """One epoch at 16 px: each backend reads the demo's data in its own form (ffcv: .beton files converted once),
    and the model has Fashion-MNIST's 10 classes."""
    import torch

    from fastimagenet.cli import main
    from fastimagenet.config import from_saved
    from fastimagenet.metrics import read_metrics

    run = tmp_path / "run"
    assert main(["demo", "--loader", loader, "--out-dir", str(run), "epochs=1", "schedule.stages=0,16,10",
                 "data.val_resolution=16", "loader.workers=1", "loader.synthetic_samples=20"]) == 0
    data = "synthetic images" if loader == "synthetic" else "Fashion-MNIST"
    assert f"demo: {data}" in capsys.readouterr().out
    cfg = from_saved(run / "config.yaml")
    assert cfg.loader.name == loader and cfg.data.train.endswith("train.beton" if loader == "ffcv" else "train")
    [record] = read_metrics(run)
    assert record["resolution"] == 16 and (loader == "synthetic" or record["val_images"] == 10)
    assert torch.load(run / "last.pt", weights_only=False)["model"]["fc.weight"].shape[0] == 10
    if loader == "ffcv":  # raw pixels: a 28 px image is not worth a second JPEG encoding
        from fastimagenet.dataset_tools.inspect_beton import inspect_beton

        assert inspect_beton(cfg.data.train, verify=False)["write_modes"] == {"raw": 20}


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.slow
def test_demo_command_learns_fashion_mnist_quickly(tmp_path, monkeypatch, capsys):
    """The real demo data and recipe, shortened to one low-resolution epoch."""
    from fastimagenet import cli

    monkeypatch.setattr(cli, "DATA_HOME", tmp_path / "data")
    assert cli.main(["demo", "--out-dir", str(tmp_path / "run"), "epochs=1", "schedule.stages=0,16,512",
                     "data.val_resolution=16"]) == 0
    out = capsys.readouterr().out
    assert "demo: Fashion-MNIST val top-1" in out
    top1 = float(out.rsplit("val top-1 ", 1)[1].split("%")[0])
    assert top1 > 60  # 10 classes: chance is 10%
