"""torchvision backend: decode correctness, odd files, bad files, persistent workers across reconfigure, /dev/shm."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastimagenet import loaders
from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools.scan import scan_image_folder
from fastimagenet.loaders import torchvision_loader
from fastimagenet.loaders.augment import center_crop_box
from fastimagenet.loaders.image_decode import decode_crop
from fastimagenet.loaders.torchvision_loader import shm_bytes_needed
from tests.conftest import make_spec


def _gradient(width, height):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)


def test_dct_scaled_decode_matches_full_decode(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(_gradient(640, 480)).save(path, quality=95)
    box_of = lambda w, h: center_crop_box(w, h, 0.875)  # noqa: E731
    fast = decode_crop(str(path), box_of, 64, flip=False)  # decodes at 1/4 scale
    flipped = decode_crop(str(path), box_of, 64, flip=True)
    with Image.open(path) as img:
        reference = np.asarray(img.convert("RGB").resize((64, 64), Image.BILINEAR, box=box_of(640, 480)))
    assert fast.shape == (64, 64, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - reference).mean() < 3
    assert np.array_equal(flipped, fast[:, ::-1])


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")])
def test_odd_modes_become_rgb(tmp_path, mode, fmt):
    path = tmp_path / "odd.JPEG"  # a PNG saved with a .JPEG name is decoded by its content
    source = _gradient(80, 60)
    Image.fromarray(source).convert(mode).save(path, format=fmt, quality=95)
    out = decode_crop(str(path), lambda w, h: (0, 0, w, h), 40, flip=False)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(source).convert(mode).convert("RGB").resize((40, 40)))
    assert np.abs(out.astype(int) - expected).mean() < 8  # same picture, in RGB order


def test_bad_files_are_left_out_and_reported_up_front(folder_with_bad_files, capsys):
    scan = scan_image_folder(folder_with_bad_files)
    assert list(scan.skipped) == [str(folder_with_bad_files / "class_02" / "notes.txt")]
    loader = loaders.build_loader("torchvision", make_spec(folder_with_bad_files, batch_size=96))
    # the files every backend leaves out (tests/test_bad_files.py): GIF is not kept, though PIL could read it
    assert sorted(p.rsplit("/", 1)[1] for p in loader.skipped) == ["a_gif.jpg", "not_really.jpg", "notes.txt",
                                                                   "truncated.jpg"]
    assert "warning: 4 files" in capsys.readouterr().out
    (images, labels), = list(loader)
    assert images.shape[0] == 96


def test_an_image_damaged_after_verification_is_replaced_and_reported(jpeg_dataset, tmp_path, capsys):
    root = tmp_path / "train"
    shutil.copytree(jpeg_dataset / "train", root)
    loader = loaders.build_loader("torchvision", make_spec(root, batch_size=96))
    damaged = sorted((root / "class_01").glob("*.jpg"))[0]
    damaged.write_bytes(damaged.read_bytes()[:200])
    (images, labels), = list(loader)  # the epoch completes: the image is replaced by a neighbour, not fatal
    assert images.shape[0] == 96 and list(loader.skipped) == [str(damaged)]
    assert "1 unreadable images replaced" in capsys.readouterr().out


def test_strict_mode_makes_a_bad_file_an_error(folder_with_bad_files):
    with pytest.raises(UserError, match=r"(truncated|not_really|a_gif)\.jpg: unreadable image"):
        loaders.build_loader("torchvision", make_spec(folder_with_bad_files, batch_size=96, strict=True))


_AFTER_OPENCV_THREADS = """
import sys
import cv2, numpy as np
from fastimagenet import loaders
from tests.conftest import make_spec
cv2.resize(np.zeros((4000, 4000, 3), np.uint8), (8000, 8000))  # runs on OpenCV's thread pool, which now exists
for images, labels in loaders.build_loader("torchvision", make_spec(sys.argv[1], workers=2)):
    pass
print("done")
"""


def test_workers_start_in_a_process_whose_opencv_pool_is_running(jpeg_dataset, tmp_path):
    """A process that resized a large image with OpenCV before its loader started (a convert, a benchmark of another
    backend): its forked workers would wait for ever on the thread pool they inherit without its threads, unless
    the pool is shrunk around their start (image_decode.forking_workers)."""
    run = subprocess.run([sys.executable, "-c", _AFTER_OPENCV_THREADS, str(jpeg_dataset / "train")],
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FASTIMAGENET_CACHE": str(tmp_path)})
    assert run.returncode == 0 and run.stdout.split()[-1] == "done", run.stderr[-2000:]


def test_reconfigure_keeps_the_same_worker_processes(jpeg_dataset):
    loader = loaders.build_loader("torchvision", make_spec(jpeg_dataset / "train", workers=2, batch_size=8))
    list(loader)
    workers = [w.pid for w in loader._loader._iterator._workers]
    loader.reconfigure(48, 24)
    loader.set_epoch(1)
    shapes = {tuple(images.shape) for images, _ in loader}
    assert shapes == {(24, 3, 48, 48)}
    assert [w.pid for w in loader._loader._iterator._workers] == workers


def test_train_crops_are_reproducible(jpeg_dataset):
    def first_batch():
        loader = loaders.build_loader("torchvision", make_spec(jpeg_dataset / "train", seed=1, batch_size=8))
        loader.set_epoch(3)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(), first_batch())


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing", "data directory does not exist"),
    (lambda root: root, "no class sub-directories"),
    (lambda root: (root / "cat").mkdir() or root, "class directory has no images"),
    (lambda root: (root / "f.jpg").write_bytes(b"x") and root / "f.jpg", "found a file"),
])
def test_bad_folders_have_clear_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        loaders.build_loader("torchvision", make_spec(make(tmp_path)))


def test_val_classes_must_exist_in_train(jpeg_dataset, tmp_path):
    shutil.copytree(jpeg_dataset / "val", tmp_path / "val")
    shutil.copytree(tmp_path / "val" / "class_00", tmp_path / "val" / "zebra")
    with pytest.raises(UserError, match="classes not present in the train split: zebra"):
        loaders.build_loader("torchvision", make_spec(tmp_path / "val", train=False,
                                                      classes=[f"class_{i:02d}" for i in range(4)]))


def test_batch_larger_than_the_dataset_is_an_error(jpeg_dataset):
    with pytest.raises(UserError, match="batch size 128 is larger than the 96 samples"):
        loaders.build_loader("torchvision", make_spec(jpeg_dataset / "train", batch_size=128))
    loader = loaders.build_loader("torchvision", make_spec(jpeg_dataset / "train"))
    with pytest.raises(UserError, match="batch size 200 is larger"):
        loader.reconfigure(32, 200)


def test_shared_memory_need_counts_every_batch_in_flight():
    assert shm_bytes_needed(0, 256, 224) == 0  # no workers: batches never leave the process
    assert shm_bytes_needed(1, 1, 1) == 5 * (3 + 8)  # 4 prefetched + 1 in use; 3 pixel bytes + an int64 label
    # 8 GPU processes, 12 workers each, 128 images at 224 px: 7.0 GiB, against a container's default 64 MB
    assert shm_bytes_needed(12, 128, 224, processes=8) == 8 * 49 * 128 * (224 * 224 * 3 + 8) == 7_553_294_336


def _shm_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(torchvision_loader, "_shm_space", lambda: (64 * 2**20, free))


def test_workers_that_would_overflow_dev_shm_are_a_clear_error(jpeg_dataset, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    # 2 workers x (4 + 1) ... : 9 batches of 8 x (32 x 32 x 3 + 8) bytes = 221,760 bytes; 1 worker: 123,200
    _shm_free(monkeypatch, 200_000)
    with pytest.raises(UserError, match=r"2 workers x 4 prefetched batches .* need 0\.2 MiB of shared memory "
                                        r"\(/dev/shm\) but 0\.2 MiB are free.*--shm-size=1g.*loader\.workers=1.*"
                                        r"smaller batch"):
        loaders.build_loader("torchvision", make_spec(jpeg_dataset / "train", workers=2, batch_size=8))
    loaders.build_loader("torchvision", make_spec(jpeg_dataset / "train", workers=1, batch_size=8))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the ranks of a node share its /dev/shm
    with pytest.raises(UserError, match=r"1 workers .* in each of 2 process\(es\) on this node"):
        loaders.build_loader("torchvision", make_spec(jpeg_dataset / "train", workers=1, batch_size=8))


def test_reconfigure_checks_dev_shm_when_batches_grow(jpeg_dataset, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    _shm_free(monkeypatch, 300_000)
    loader = loaders.build_loader("torchvision", make_spec(jpeg_dataset / "train", workers=2, batch_size=8))
    _shm_free(monkeypatch, 1)  # smaller batches need no new room
    loader.reconfigure(24, 4)
    _shm_free(monkeypatch, 300_000)  # 9 batches of 8 at 48 px: 498,240 bytes
    with pytest.raises(UserError, match=r"of 8 images at 48 px, .* need 0\.5 MiB"):
        loader.reconfigure(48, 8)
