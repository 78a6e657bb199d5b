"""`fastimagenet convert` / `inspect`: round trips, ImageNet's file quirks, and outputs that are whole or absent."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fastimagenet.cli import main
from fastimagenet.common.errors import UserError
from fastimagenet.common.threads import importing_ffcv
from fastimagenet.dataset_tools.beton_file import Beton
from fastimagenet.dataset_tools.convert import ConvertOptions, convert, convert_folder, load_rgb, read_sidecar
from fastimagenet.dataset_tools.inspect_beton import inspect_beton

EXIF_ORIENTATION = 0x0112


def gradient(width: int, height: int) -> np.ndarray:
    """Smooth content (JPEG keeps it well) whose every corner differs, so rotations and crops show."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([255 * x / width, 255 * y / height, np.full_like(x, 90)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def quirks(tmp_path_factory):
    """One class of ImageNet's real oddities (sorted names fix the record order) and one of a plain image."""
    root = tmp_path_factory.mktemp("quirks")
    odd, plain = root / "a_odd", root / "b_plain"
    odd.mkdir()
    plain.mkdir()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(odd / "1_cmyk.JPEG", quality=95)  # pure red in CMYK
    Image.new("L", (40, 30), 77).save(odd / "2_gray.JPEG", quality=95)
    Image.fromarray(gradient(40, 30)).save(odd / "3_png_named.JPEG", format="PNG")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "display rotated 90 degrees clockwise"
    Image.fromarray(gradient(40, 30)).save(odd / "4_rotated.jpg", quality=95, exif=exif)
    Image.fromarray(gradient(1200, 300)).save(odd / "5_huge.jpg", quality=90)
    whole = (odd / "4_rotated.jpg").read_bytes()
    (odd / "6_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (odd / "7_not_an_image.jpg").write_bytes(b"<html>404 not found</html>")
    Image.fromarray(gradient(32, 32)).save(plain / "img.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def quirks_beton(quirks, tmp_path_factory):
    return convert_folder(quirks, tmp_path_factory.mktemp("out") / "quirks.beton", max_resolution=256, workers=2)


def test_quirks_become_rgb_and_bad_files_are_reported(quirks, quirks_beton):
    beton = Beton(quirks_beton)
    assert len(beton.images) == 6 and beton.labels.tolist() == [0, 0, 0, 0, 0, 1]
    cmyk, gray, png, rotated, huge, plain = (beton.pixels(i).astype(int) for i in range(6))
    assert np.abs(cmyk.mean(axis=(0, 1)) - [255, 0, 0]).max() < 12  # CMYK -> RGB red
    assert gray.shape == (30, 40, 3) and np.abs(gray - 77).max() < 6  # grayscale -> three equal channels
    assert np.abs(png - gradient(40, 30)).mean() < 3  # decoded as the PNG it is
    # EXIF orientation is ignored, as by the other backends: the pixels as stored, not turned upright
    assert rotated.shape == (30, 40, 3) and np.abs(rotated - gradient(40, 30)).mean() < 4
    assert huge.shape == (64, 256, 3)  # longer side scaled down to max_resolution, aspect kept
    assert plain.shape == (32, 32, 3)
    skipped = read_sidecar(quirks_beton)["skipped"]
    assert set(skipped) == {str(quirks / "a_odd" / name) for name in ("6_truncated.jpg", "7_not_an_image.jpg")}
    assert all(reason for reason in skipped.values())


def test_summary_lists_every_skip(quirks, tmp_path, capsys):
    assert main(["convert", str(quirks), str(tmp_path / "q.beton"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 images, 2 classes" in out and "images/s" in out and "skipped 2 files" in out
    assert "6_truncated.jpg: " in out and "7_not_an_image.jpg: UnidentifiedImageError" in out


def test_strict_makes_an_unreadable_file_an_error(quirks, tmp_path):
    dst = tmp_path / "q.beton"
    with pytest.raises(UserError, match="6_truncated.jpg: unreadable image"):
        convert_folder(quirks, dst, strict=True, workers=1)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing left behind


def test_round_trip_keeps_labels_and_pixels(one_per_class, tmp_path):
    for mode, tolerance in (("raw", 0.0), ("jpg", 3.0)):
        beton = Beton(convert_folder(one_per_class, tmp_path / f"{mode}.beton", write_mode=mode, workers=1))
        paths = sorted(one_per_class.glob("*/*"))
        assert beton.labels.tolist() == list(range(16))
        assert set(beton.images["mode"].tolist()) == {0 if mode == "jpg" else 1}
        for index, path in enumerate(paths):
            source = load_rgb(str(path), 512).astype(int)
            assert np.abs(beton.pixels(index).astype(int) - source).mean() <= tolerance


def test_dataset_root_gives_val_the_train_classes(tmp_path):
    for split, classes in (("train", "abc"), ("val", "ac")):
        for name in classes:
            (tmp_path / "src" / split / name).mkdir(parents=True)
            Image.fromarray(gradient(24, 24)).save(tmp_path / "src" / split / name / "x.jpg")
    reports = convert(tmp_path / "src", tmp_path / "out", ConvertOptions(workers=1, max_resolution=16))
    assert [r.path.name for r in reports] == ["train.beton", "val.beton"]
    assert read_sidecar(tmp_path / "out" / "val.beton")["classes"] == ["a", "b", "c"]
    assert Beton(tmp_path / "out" / "val.beton").labels.tolist() == [0, 2]
    assert Beton(tmp_path / "out" / "train.beton").images["width"].tolist() == [16, 16, 16]
    with pytest.raises(UserError, match="already exists"):
        convert(tmp_path / "src", tmp_path / "out", ConvertOptions(workers=1))


def test_subset_takes_the_first_images_of_each_class(jpeg_dataset, tmp_path):
    beton = Beton(convert_folder(jpeg_dataset / "val", tmp_path / "s.beton", subset=3, workers=1))
    assert beton.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_existing_output_is_kept_unless_forced(one_per_class, tmp_path):
    dst = tmp_path / "d.beton"
    dst.write_text("precious")
    with pytest.raises(UserError, match="already exists"):
        convert_folder(one_per_class, dst)
    assert dst.read_text() == "precious"
    convert_folder(one_per_class, dst, force=True, workers=1)
    assert len(Beton(dst).images) == 16


def test_interrupted_convert_leaves_no_output_and_a_rerun_works(one_per_class, tmp_path, monkeypatch):
    with importing_ffcv():  # as convert imports FFCV (a first import picks numba's threading layer)
        from ffcv.writer import DatasetWriter

    def interrupted(self, allocations):
        raise KeyboardInterrupt

    dst = tmp_path / "d.beton"
    with monkeypatch.context() as patch:
        patch.setattr(DatasetWriter, "finalize", interrupted)
        with pytest.raises(KeyboardInterrupt):
            convert_folder(one_per_class, dst, workers=1)
    assert list(tmp_path.iterdir()) == []
    convert_folder(one_per_class, dst, workers=1)
    assert len(Beton(dst).images) == 16


@pytest.mark.parametrize("options, message", [
    (dict(write_mode="png"), "write mode 'png'"),
    (dict(max_resolution=0), "max resolution 0"),
    (dict(jpeg_quality=101), "JPEG quality 101"),
    (dict(compress_probability=1.5), "compress probability 1.5"),
])
def test_bad_options_are_clear_errors(one_per_class, tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        convert_folder(one_per_class, tmp_path / "d.beton", **options)


def test_output_of_a_split_must_be_a_beton(one_per_class, tmp_path):
    with pytest.raises(UserError, match="must be a .beton file"):
        convert_folder(one_per_class, tmp_path / "d")


def test_inspect_shows_contents_and_verify_finds_a_damaged_record(quirks_beton, tmp_path, capsys):
    info = inspect_beton(quirks_beton, verify=True)
    assert info["images"] == 6 and info["classes"] == 2 and info["verified"]
    assert info["write_modes"] == {"jpg": 6} and info["width"]["max"] == 256 and info["skipped_at_convert"] == 2
    damaged = tmp_path / "damaged.beton"
    data = bytearray(quirks_beton.read_bytes())
    ptr = int(Beton(quirks_beton).images[1]["data_ptr"])
    data[ptr : ptr + 200] = bytes(200)  # wipe the JPEG header of record 1
    damaged.write_bytes(bytes(data))
    assert main(["inspect", str(damaged), "--verify"]) == 2
    out = capsys.readouterr().out
    assert "record 1" in out and "verified: False" in out


def test_inspect_rejects_a_file_that_is_not_a_beton(tmp_path):
    bogus = tmp_path / "x.beton"
    bogus.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="not a readable .beton"):
        inspect_beton(bogus)


def test_sidecar_records_the_settings(quirks_beton):
    meta = json.loads(quirks_beton.with_name(quirks_beton.name + ".json").read_text())
    assert meta["classes"] == ["a_odd", "b_plain"] and meta["images"] == 6
    assert meta["write_mode"] == "jpg" and meta["max_resolution"] == 256 and meta["jpeg_quality"] == 90


# ---------------------------------------------------------------------------------------------- the CLI's settings
def convert_cli(src, dst, *flags) -> Beton:
    assert main(["convert", str(src), str(dst), "--workers", "1", *flags]) == 0
    return Beton(dst)


def jpeg_count(beton: Beton) -> int:
    return beton.images["mode"].tolist().count(0)  # FFCV's storage mode per record: 0 JPEG, 1 raw pixels


def test_proportion_mode_stores_the_share_compress_probability_asks_for(one_per_class, tmp_path):
    half = convert_cli(one_per_class, tmp_path / "half.beton", "--write-mode", "proportion")
    assert 0 < jpeg_count(half) < 16  # the default share, 0.5: all 16 alike has a chance of 2 in 65536
    every = convert_cli(one_per_class, tmp_path / "every.beton", "--write-mode", "proportion",
                        "--compress-probability", "1")
    assert jpeg_count(every) == 16


def test_smart_mode_stores_as_jpeg_the_images_whose_pixels_exceed_the_threshold(one_per_class, tmp_path):
    threshold = 48 * 48 * 3  # one_per_class: sides of 36 to 60 px, so images on both sides of it
    beton = convert_cli(one_per_class, tmp_path / "s.beton", "--write-mode", "smart", "--smart-threshold",
                        str(threshold))
    sizes = [Image.open(path).size for path in sorted(one_per_class.glob("*/*"))]
    expected = [0 if width * height * 3 > threshold else 1 for width, height in sizes]
    assert 0 < expected.count(0) < 16 and beton.images["mode"].tolist() == expected


def test_jpeg_quality_trades_stored_bytes_for_fidelity(one_per_class, tmp_path):
    paths = sorted(one_per_class.glob("*/*"))

    def stored_bytes(beton):
        return int(beton.record_bytes.sum())

    def error(beton):
        return np.mean([np.abs(beton.pixels(i).astype(int) - load_rgb(str(path), 512)).mean()
                        for i, path in enumerate(paths)])

    low, high = (convert_cli(one_per_class, tmp_path / f"q{q}.beton", "--jpeg-quality", str(q)) for q in (20, 95))
    assert stored_bytes(low) < stored_bytes(high) / 2 and error(low) > 2 * error(high)


@pytest.fixture
def splits_with_classes_apart(tmp_path):
    """src/train with classes a, b, c and src/val with a and c only: by its own folders val's c would be label 1."""
    for split, classes in (("train", "abc"), ("val", "ac")):
        for name in classes:
            (tmp_path / "src" / split / name).mkdir(parents=True)
            Image.fromarray(gradient(24, 24)).save(tmp_path / "src" / split / name / "x.jpg")
    return tmp_path / "src"


def test_classes_from_labels_a_split_with_the_train_splits_classes(splits_with_classes_apart, tmp_path):
    convert_cli(splits_with_classes_apart / "train", tmp_path / "train.beton")
    val = convert_cli(splits_with_classes_apart / "val", tmp_path / "val.beton", "--classes-from",
                      str(tmp_path / "train.beton"))
    assert val.labels.tolist() == [0, 2] and read_sidecar(tmp_path / "val.beton")["classes"] == ["a", "b", "c"]


@pytest.mark.parametrize("flags, message", [
    (["--jpeg-quality", "0"], "JPEG quality 0 must be between 1 and 100"),
    (["--compress-probability", "1.5"], "compress probability 1.5 must be between 0 and 1"),
    (["--smart-threshold", "-1"], "subset, workers and smart threshold must not be negative"),
    (["--max-resolution", "8"], "max resolution 8 must be between 16 and 65535 pixels"),
    (["--classes-from", "train.beton"], "train.beton.json: missing, so the class names of train.beton are unknown"),
])
def test_bad_settings_exit_2_with_a_message_and_write_nothing(flags, message, one_per_class, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(one_per_class), "out/d.beton", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_a_dataset_root_is_checked_whole_before_anything_is_written(splits_with_classes_apart, tmp_path, capsys):
    Image.fromarray(gradient(24, 24)).save(splits_with_classes_apart / "val" / "a" / "y.jpg")
    (splits_with_classes_apart / "val" / "d").mkdir()  # a class train does not have
    Image.fromarray(gradient(24, 24)).save(splits_with_classes_apart / "val" / "d" / "x.jpg")
    out = tmp_path / "out"
    assert main(["convert", str(splits_with_classes_apart), str(out)]) == 2
    assert "val: classes not present in the train split: d" in capsys.readouterr().err
    assert not out.exists()  # not even train.beton, which a re-run would then refuse to overwrite
    assert main(["convert", str(splits_with_classes_apart), str(tmp_path / "data.beton")]) == 2
    assert "holds train/ and val/: give an output directory" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nowhere"), str(out / "x.beton")]) == 2
    assert "nowhere: data directory does not exist" in capsys.readouterr().err
    assert not out.exists()
