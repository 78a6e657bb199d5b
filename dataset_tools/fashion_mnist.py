"""The built-in demo dataset: Debian's Fashion-MNIST idx files turned into an ImageFolder of JPEGs (once, cached), and
for the ffcv loader into .beton files."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fastimagenet.errors import UserError

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


def prepare_fashion_mnist(out_dir: Path, source: Path = DEBIAN_DIR, quality: int = 95) -> Path:
    """Write out_dir/{train,val}/<class>/<n>.jpg. A finished tree is marked by a stamp file, so an interrupted
    run is redone rather than mistaken for a whole dataset."""
    out_dir = Path(out_dir)
    stamp = out_dir / ".complete"
    if stamp.exists():
        return out_dir
    if not source.is_dir():
        raise UserError(f"{source}: Fashion-MNIST not found; install it with: apt-get install dataset-fashion-mnist")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, prefix in _SPLITS.items():
        images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz", 2051)
        labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 2049)
        for name in CLASSES:
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
        for i, (pixels, label) in enumerate(tqdm(list(zip(images, labels)), desc=f"fashion-mnist {split}")):
            Image.fromarray(pixels, mode="L").save(tmp / split / CLASSES[label] / f"{i:05d}.jpg", quality=quality)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    stamp.touch()
    return out_dir


def fashion_mnist_betons(root: Path) -> tuple[Path, Path]:
    """The prepared folders under `root` as root/ffcv-raw/{train,val}.beton, for the ffcv loader; converted once
    (val.beton is written last, so its presence means both are whole). Raw pixels: at 28 px an image is 2.3 KiB, and
    a second JPEG encoding would lose detail for nothing."""
    out = Path(root) / "ffcv-raw"
    if not (out / "val.beton").is_file():
        from dataset_tools.convert import ConvertOptions, convert

        print(f"converting {root} to .beton files for the ffcv loader (once): {out}")
        # force: a train.beton left by an interrupted conversion
        for report in convert(root, out, ConvertOptions(write_mode="raw", force=True)):
            print(report.summary())
    return out / "train.beton", out / "val.beton"
