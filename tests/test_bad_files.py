"""The bad-file gauntlet: one folder of every odd or broken file a real dataset holds. Each file is kept by every
backend and `convert`, or reported by all of them; nothing aborts, hangs or allocates a decompression bomb. And disk
trouble: a write that fails ends with a message naming the file and leaves the previous file (or none) behind."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fastimagenet import checkpoint
from fastimagenet.cli import main
from fastimagenet.common.atomic import WriteFailed, atomic_output
from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools.beton_file import Beton
from fastimagenet.dataset_tools.convert import ConvertOptions, convert_split, load_rgb
from fastimagenet.dataset_tools.image_rules import MIN_STORED_SIDE
from fastimagenet.loaders.image_decode import decode_crop
from tests.conftest import make_spec

ROOT = Path(__file__).resolve().parent.parent

# name (relative to the gauntlet folder) -> kept by every backend (True) or reported by every backend (False)
KEPT = ["class_a/progressive.jpg", "class_a/restart_markers.jpg", "class_a/cmyk.jpg", "class_a/tiny_1x1.jpg",
        "class_a/tiny_1x1.png", "class_a/sliver_8x3000.jpg", "class_a/sliver_3000x6.jpg", "class_a/sliver_1x700.png",
        "class_a/nested/inner.jpg", "class_b/gray16.png", "class_b/gray_alpha.png", "class_b/palette_alpha.png",
        "class_b/fmt.webp", "class_b/fmt.tiff", "class_b/fmt.bmp", "class_b/webp_named.JPEG",
        "class_b/tiff_named.JPEG", "class_b/bmp_named.JPEG", "class_b/animated.webp"]
REPORTED = ["class_a/corrupt_scan.jpg", "class_a/huge_header.jpg", "class_a/truncated.jpg", "class_a/empty.jpg",
            "class_a/dangling.jpg", "class_b/fmt.gif", "class_b/gif_named.JPEG", "class_b/animated.gif",
            "class_b/animated_gif_named.JPEG", "class_b/bomb.png", "class_b/error_page.JPEG", "class_b/notes.txt"]
IGNORED = ["class_a/.DS_Store", "class_a/._good0.jpg", "class_a/.ipynb_checkpoints/good0-checkpoint.jpg"]
GOOD_PER_CLASS = 6


def gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([255 * x / width, 255 * y / height, np.full_like(x, 90)], axis=-1).astype(np.uint8)


def bomb_png(path: Path, side: int = 30_000) -> None:
    """A 1-bit PNG of side x side pixels (900 megapixels; 2.7 GB as RGB) in ~110 KB, written row by row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def make_gauntlet(root: Path) -> Path:
    a, b = root / "class_a", root / "class_b"
    for folder in (a, b):
        folder.mkdir(parents=True)
        for i in range(GOOD_PER_CLASS):
            Image.fromarray(gradient(64 + i, 48)).save(folder / f"good{i}.jpg", quality=90)
    picture = gradient(120, 90)
    Image.fromarray(picture).save(a / "progressive.jpg", progressive=True, quality=90)
    cv2.imwrite(str(a / "restart_markers.jpg"), picture[..., ::-1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 1])
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(a / "cmyk.jpg")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(a / "tiny_1x1.jpg")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(a / "tiny_1x1.png")
    Image.fromarray(gradient(8, 3000)).save(a / "sliver_8x3000.jpg")
    Image.fromarray(gradient(3000, 6)).save(a / "sliver_3000x6.jpg")
    Image.fromarray(gradient(1, 700)).save(a / "sliver_1x700.png")
    (a / "nested").mkdir()
    Image.fromarray(gradient(70, 50)).save(a / "nested" / "inner.jpg")
    Image.fromarray(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20).save(b / "gray16.png")  # I;16
    Image.new("LA", (40, 30), (120, 128)).save(b / "gray_alpha.png")
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(b / "palette_alpha.png", transparency=0)
    small = Image.fromarray(gradient(50, 40))
    for fmt, ext in (("WEBP", "webp"), ("TIFF", "tiff"), ("BMP", "bmp"), ("GIF", "gif")):
        small.save(b / f"fmt.{ext}", format=fmt)
        small.save(b / f"{ext}_named.JPEG", format=fmt)
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(b / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(b / "animated_gif_named.JPEG", format="GIF", save_all=True, append_images=frames[1:])
    frames[0].save(b / "animated.webp", save_all=True, append_images=frames[1:], duration=100)
    # random bytes in the middle of the entropy-coded scan (PIL: "broken data stream"; OpenCV decodes noise)
    data = bytearray(cv2.imencode(".jpg", gradient(256, 192))[1].tobytes())
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    data[middle : middle + 400] = np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
    (a / "corrupt_scan.jpg").write_bytes(bytes(data))
    header = bytearray(cv2.imencode(".jpg", gradient(64, 48))[1].tobytes())  # SOF0 claims 65000 x 65000
    sof = header.index(b"\xff\xc0")
    header[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    (a / "huge_header.jpg").write_bytes(bytes(header))
    whole = (a / "good0.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (a / "empty.jpg").write_bytes(b"")
    os.symlink(root / "nowhere.jpg", a / "dangling.jpg")
    bomb_png(b / "bomb.png")
    (b / "error_page.JPEG").write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    (b / "notes.txt").write_text("not an image")
    (a / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 100)
    (a / "._good0.jpg").write_bytes(b"\0\5\26\7" + b"\0" * 60)  # macOS's AppleDouble twin
    (a / ".ipynb_checkpoints").mkdir()
    (a / ".ipynb_checkpoints" / "good0-checkpoint.jpg").write_bytes(whole)
    return root


@pytest.fixture(scope="module")
def gauntlet(tmp_path_factory):
    return make_gauntlet(tmp_path_factory.mktemp("gauntlet") / "train")


@pytest.fixture(autouse=True)
def _own_verification_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTIMAGENET_CACHE", str(tmp_path / "cache"))


def names(paths, root: Path) -> set[str]:
    return {os.path.relpath(path, root) for path in paths}


def test_the_fixture_lists_every_file():
    root = make_gauntlet(Path(os.environ.get("TMPDIR", "/tmp")) / f"gauntlet-list-{os.getpid()}")
    try:
        on_disk = {os.path.relpath(os.path.join(top, n), root) for top, dirs, files in os.walk(root) for n in files}
        goods = {f"class_{c}/good{i}.jpg" for c in "ab" for i in range(GOOD_PER_CLASS)}
        assert on_disk == set(KEPT) | set(REPORTED) | set(IGNORED) | goods
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


_FFCV_RUN = """
import sys
from fastimagenet.loaders import build_loader
from tests.conftest import make_spec
beton = sys.argv[1]
for train in (True, False):
    loader = build_loader("ffcv", make_spec(beton, train=train, name="ffcv", resolution=32, batch_size=4))
    seen = sum(len(labels) for _, labels in loader)
    print("train" if train else "eval", seen)
"""


def test_every_backend_keeps_and_reports_the_same_files(gauntlet, tmp_path, capsys):
    expected_kept = set(KEPT) | {f"class_{c}/good{i}.jpg" for c in "ab" for i in range(GOOD_PER_CLASS)}
    from fastimagenet.loaders.dali_loader import DaliLoader
    from fastimagenet.loaders.torchvision_loader import TorchvisionLoader

    skipped = {}
    for name, cls in (("torchvision", TorchvisionLoader), ("dali", DaliLoader)):
        loader = cls(make_spec(gauntlet, train=False, name=name, workers=1))
        kept = sum(len(labels) for _, labels in loader)  # an evaluation pass decodes every kept file
        assert kept == len(expected_kept), name
        skipped[name] = names(loader.skipped, gauntlet)
    assert "unreadable images replaced" not in capsys.readouterr().out  # nothing failed after verification

    report = convert_split(gauntlet, tmp_path / "g.beton", ConvertOptions(workers=2))
    skipped["convert"] = names(report.skipped, gauntlet)
    assert report.images == len(expected_kept)
    assert skipped["torchvision"] == skipped["dali"] == skipped["convert"] == set(REPORTED)

    beton = Beton(tmp_path / "g.beton")  # only what FFCV's decoders can crop
    assert min(int(beton.images["width"].min()), int(beton.images["height"].min())) >= MIN_STORED_SIDE
    # FFCV trains and evaluates on it in a process of its own: an abort there is a failure here, not a dead runner
    run = subprocess.run([sys.executable, "-c", _FFCV_RUN, str(tmp_path / "g.beton")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["train", str(len(expected_kept) // 4 * 4), "eval", str(len(expected_kept))]


def test_the_reasons_say_what_is_wrong(gauntlet):
    from fastimagenet.dataset_tools.scan import scan_image_folder
    from fastimagenet.dataset_tools.verify import kept_samples

    skipped = kept_samples(scan_image_folder(gauntlet), str(gauntlet), report=False).skipped
    reason = {os.path.relpath(path, gauntlet): why for path, why in skipped.items()}
    for bomb in ("class_b/bomb.png", "class_a/huge_header.jpg"):  # PIL's words above twice its limit, ours below
        assert "decompression bomb" in reason[bomb].lower()
    assert "GIF images are not supported" in reason["class_b/gif_named.JPEG"]
    assert "not an image file extension" in reason["class_b/fmt.gif"]
    assert "broken symbolic link" in reason["class_a/dangling.jpg"]
    assert "UnidentifiedImageError" in reason["class_b/error_page.JPEG"]


def test_sixteen_bit_gray_is_scaled_not_clipped(gauntlet):
    """PIL's own conversion clips 16-bit values, which turns most of the image white; DALI scales them."""
    expected = (np.arange(48 * 64).reshape(48, 64) * 20) >> 8
    stored = load_rgb(str(gauntlet / "class_b" / "gray16.png"), 512)
    assert stored.shape == (48, 64, 3) and np.abs(stored[..., 0].astype(int) - expected).max() <= 1
    crop = decode_crop(str(gauntlet / "class_b" / "gray16.png"), lambda w, h: (0, 0, w, h), 64, False)
    assert abs(crop.mean() - expected.mean()) < 3


def test_thin_images_are_stored_thick_enough_for_ffcv(gauntlet):
    assert load_rgb(str(gauntlet / "class_a" / "tiny_1x1.jpg"), 512).shape == (16, 16, 3)
    assert load_rgb(str(gauntlet / "class_a" / "sliver_3000x6.jpg"), 512).shape == (16, 512, 3)  # 512x1 after scaling
    assert load_rgb(str(gauntlet / "class_a" / "sliver_8x3000.jpg"), 512).shape == (512, 16, 3)


_PEAK_MEMORY = """
import sys
from tests.decode_memory import peak_growth, refused_everywhere
print(peak_growth(lambda: [refused_everywhere(path) for path in sys.argv[1:]]))
"""


def test_decompression_bombs_are_refused_without_allocating_them(gauntlet):
    """The 900-megapixel PNG (2.7 GB as RGB) and the 65000 x 65000 JPEG header: verification, convert's decode and
    the torchvision decode all refuse them from the header; the process's peak memory does not move."""
    bomb, header = gauntlet / "class_b" / "bomb.png", gauntlet / "class_a" / "huge_header.jpg"
    run = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(bomb), str(header)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout) < 20, f"refusing them raised the peak memory by {run.stdout.strip()} MiB"


def test_a_pil_limit_switched_off_does_not_let_a_bomb_through(gauntlet, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # as some libraries do
    from fastimagenet.dataset_tools.verify import inspect_image

    assert "refused before decoding" in inspect_image(str(gauntlet / "class_b" / "bomb.png")).problem


# --- disk trouble -----------------------------------------------------------------------------------------------

def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    last = tmp_path / "last.pt"
    checkpoint.atomic_torch_save({"epoch": 1}, last)

    def disk_full(obj, file):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=rf"{last}: could not be written: the disk is full .*the previous file is "
                                        "unchanged"):
        checkpoint.atomic_torch_save({"epoch": 2}, last)
    monkeypatch.undo()
    assert torch.load(last)["epoch"] == 1 and sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_a_real_enospc_from_the_kernel_is_the_same_message(tmp_path):
    """/dev/full answers every write with ENOSPC: the temporary file of the write is made a link to it."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    last = tmp_path / "last.pt"
    checkpoint.atomic_torch_save({"epoch": 1}, last)
    os.symlink("/dev/full", tmp_path / f".last.pt.tmp{os.getpid()}")
    with pytest.raises(WriteFailed, match="the disk is full"):
        checkpoint.atomic_torch_save({"epoch": 2, "weights": torch.zeros(100_000)}, last)
    assert torch.load(last)["epoch"] == 1 and sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_a_full_disk_while_converting_leaves_no_beton(gauntlet, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    out = tmp_path / "g.beton"
    os.symlink("/dev/full", tmp_path / f".g.beton.tmp{os.getpid()}")
    with pytest.raises(UserError, match=rf"{out}: could not be written: the disk is full.*nothing was written"):
        convert_split(gauntlet, out, ConvertOptions(workers=2))
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no .beton, no temporary or failure-log file: the cache only


def test_an_unwritable_destination_is_a_clear_cli_error(gauntlet, tmp_path, capsys):
    """A path inside a file stands in for a read-only directory (tests run as root, for whom chmod stops nothing)."""
    (tmp_path / "a_file").write_text("")
    assert main(["convert", str(gauntlet), str(tmp_path / "a_file" / "g.beton")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a_file' / 'g.beton'}: could not be written" in err and "Traceback" not in err


def test_code_that_can_do_without_a_file_still_catches_an_oserror(tmp_path):
    with pytest.raises(OSError):
        with atomic_output(tmp_path / "a_file" / "x"):
            pass
