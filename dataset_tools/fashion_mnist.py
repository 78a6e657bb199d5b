"""The built-in demo dataset: Debian's Fashion-MNIST idx files turned (once, cached) into an ImageFolder of JPEGs for
the folder backends, or straight into .beton files of raw pixels for the ffcv loader."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
_SPLITS = {"train": "train", "val": "t10k"}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """idx format: big-endian magic, dimension sizes, then uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read Fashion-MNIST file ({exc})") from None
    ndim = data[3]
    if int.from_bytes(data[:4], "big") != magic:
        raise UserError(f"{path}: not an idx file of the expected kind (bad magic number)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N x 28 x 28 uint8 images, N labels) of one split."""
    if not source.is_dir():
        raise UserError(f"{source}: Fashion-MNIST not found; install it with: apt-get install dataset-fashion-mnist")
    prefix = _SPLITS[split]
    images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz", 2051)
    labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 2049)
    if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max(initial=0) >= len(CLASSES):
        raise UserError(f"{source}: {prefix} holds {images.shape} images and {len(labels)} labels (at most "
                        f"{labels.max(initial=0)}); expected N 28x28 images with N labels below {len(CLASSES)}")
    return images, labels


def prepare_fashion_mnist(out_dir: Path, source: Path = DEBIAN_DIR, quality: int = 95) -> Path:
    """Write out_dir/{train,val}/<class>/<n>.jpg. A finished tree is marked by a stamp file, so an interrupted
    run is redone rather than mistaken for a whole dataset."""
    out_dir = Path(out_dir)
    stamp = out_dir / ".complete"
    if stamp.exists():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in _SPLITS:
        images, labels = _read_split(source, split)
        for name in CLASSES:
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
        for i, (pixels, label) in enumerate(tqdm(list(zip(images, labels)), desc=f"fashion-mnist {split}")):
            Image.fromarray(pixels, mode="L").save(tmp / split / CLASSES[label] / f"{i:05d}.jpg", quality=quality)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    stamp.touch()
    return out_dir


class _GrayAsRGB:
    """What FFCV's writer indexes: (28 x 28 x 3 pixels, label), the gray image in every channel, as the folder
    backends read the JPEGs."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return np.repeat(self.images[index][:, :, None], 3, axis=2), int(self.labels[index])


def fashion_mnist_betons(out_dir: Path, source: Path = DEBIAN_DIR) -> tuple[Path, Path]:
    """out_dir/{train,val}.beton for the ffcv loader, written once straight from the idx files: raw pixels (at 28 px
    an image is 2.3 KiB, and a JPEG encoding would lose detail for nothing), no image folder in between. val.beton
    is written last, so its presence means both are whole; each file appears only when complete."""
    from fastimagenet.dataset_tools.convert import ConvertOptions, write_records, write_sidecar

    out_dir = Path(out_dir)
    paths = out_dir / "train.beton", out_dir / "val.beton"
    if paths[1].is_file():
        return paths
    print(f"writing Fashion-MNIST as .beton files for the ffcv loader (once): {out_dir}")
    for split, path in zip(_SPLITS, paths):
        images, labels = _read_split(source, split)
        with atomic_output(path) as tmp:
            write_records(tmp, _GrayAsRGB(images, labels), ConvertOptions(write_mode="raw"))
            write_sidecar(path, CLASSES, len(labels), tmp, origin=str(source), write_mode="raw")
    return paths
