"""`fastimagenet bench loader`: backends against their baselines at each resolution, each pipeline in its own
process; `--baseline ffcv`: raw FFCV on a .beton of the same images, converted from a folder when needed."""

from __future__ import annotations

import json
import multiprocessing
import tempfile

import pytest

from fastimagenet import loaders
from fastimagenet import bench
from fastimagenet.cli import main
from tests.conftest import SHARDS, PacedClock, data_path


def json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_a_sweep_gives_one_row_per_resolution_with_each_baselines_ratio(jpeg_dataset, capsys, monkeypatch):
    """In this process, on a clock where a batch of the backend takes 0.5 s, one of the torchvision reference (the
    torchvision backend's raw pipeline) 2 s and one of the whole decode 0.25 s, 8 images a batch (96 images: 12
    batches a pass): 16, 4 and 32 images/s at every resolution. 'raw' of the torchvision backend is its reference,
    measured once."""
    clock = PacedClock()
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "_InOwnProcess", bench._InThisProcess)  # the same pipelines, here, on the clock
    build, raw, decode = loaders.build_loader, loaders.build_raw_pipeline, bench.whole_decode_pipeline
    built = []
    monkeypatch.setattr(loaders, "build_loader", lambda name, spec: built.append(spec.resolution) or clock.pace(
        build(name, spec), 0.5))
    monkeypatch.setattr(loaders, "build_raw_pipeline", lambda name, spec: clock.pace(raw(name, spec), 2.0))
    monkeypatch.setattr(bench, "whole_decode_pipeline", lambda spec: clock.pace(decode(spec), 0.25))
    assert main(["bench", "loader", "--loader", "torchvision", "--data", str(jpeg_dataset / "train"),
                 "--resolutions", "24,32", "--batch-size", "8", "--workers", "1", "--rounds", "2",
                 "--baseline", "raw", "torchvision", "decode"]) == 0
    out = capsys.readouterr().out
    rows = json_rows(out)
    assert [(row["loader"], row["resolution"]) for row in rows] == [("torchvision", 24), ("torchvision", 32)]
    assert built == [24, 32]  # rebuilt for each resolution
    for row in rows:
        assert (row["images_per_s"], row["torchvision_images_per_s"], row["decode_images_per_s"]) == (16, 4, 32)
        assert (row["ratio_vs_torchvision"], row["ratio_vs_raw"], row["ratio_vs_decode"]) == (4, 4, 0.5)
        assert row["round_ratios_vs_decode"] == [0.5, 0.5]
    # per resolution: an untimed pass, then 2 timed ones, of the backend, the reference and the whole decode
    assert clock.now == 2 * 3 * 12 * (0.5 + 2.0 + 0.25)
    table = out.strip().splitlines()[-3:]
    assert "px" in table[0] and "x decode" in table[0] and "x torchvision" in table[0]
    assert [line.split()[:3] for line in table[1:]] == [["torchvision", "24", "16.0"], ["torchvision", "32", "16.0"]]


def test_each_pipeline_runs_in_a_process_of_its_own(jpeg_dataset, capsys):
    assert main(["bench", "loader", "--loader", "torchvision", "--data", str(jpeg_dataset / "train"),
                 "--resolutions", "24,32", "--batch-size", "16", "--workers", "1", "--rounds", "1",
                 "--baseline", "decode"]) == 0
    rows = json_rows(capsys.readouterr().out)
    assert [row["resolution"] for row in rows] == [24, 32]
    assert all(row["images_per_s"] > 0 and row["decode_images_per_s"] > 0 for row in rows)
    assert not multiprocessing.active_children()  # every pipeline's process has ended


def test_an_error_in_a_pipelines_process_is_the_users_error_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["bench", "loader", "--loader", "torchvision", "--data", str(tmp_path / "empty"),
                 "--rounds", "1", "--workers", "1"]) == 2
    assert "no class sub-directories" in capsys.readouterr().err
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("args, message", [
    (["--resolutions", "128,x"], "expected pixel counts separated by commas"),
    (["--resolutions", "0,128"], "resolutions must be positive"),
    (["--baseline", "decode", "--data", ""], "--baseline decode reads an ImageFolder: give it with --data"),
    (["--rounds", "0"], "--rounds must be at least 1"),
])
def test_bad_input_is_a_clear_error(args, message, jpeg_dataset, capsys):
    code = None
    try:
        code = main(["bench", "loader", "--loader", "torchvision", "--data", str(jpeg_dataset / "train"), *args])
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_ffcv_baseline_converts_a_folder_into_a_temporary_beton(jpeg_dataset, tmp_path, monkeypatch, capsys):
    # a temporary directory of the test's own: another run on the machine makes its own scratch files meanwhile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert main(["bench", "loader", "--loader", "torchvision", "--data", str(jpeg_dataset / "train"),
                 "--resolution", "32", "--batch-size", "8", "--workers", "1", "--rounds", "2",
                 "--baseline", "torchvision", "ffcv"]) == 0
    result = json_rows(capsys.readouterr().out)[-1]
    assert result["ffcv_images_per_s"] > 0 and result["torchvision_images_per_s"] > 0
    assert len(result["round_ratios_vs_ffcv"]) == len(result["round_ratios_vs_torchvision"]) == 2
    assert not list(tmp_path.glob("bench-loader-*"))  # the .beton went with its temporary directory


def test_a_torchvision_baseline_for_a_beton_without_a_source_folder_is_a_clear_error(tmp_path):
    pytest.importorskip("ffcv")
    from fastimagenet.common.errors import UserError
    from fastimagenet.dataset_tools.convert import write_sidecar
    from fastimagenet.loaders import image_folder_of

    beton = tmp_path / "train.beton"
    write_sidecar(beton, ["a", "b"], 2, origin="arrays")  # as the demo writes its Fashion-MNIST files
    with pytest.raises(UserError, match=f"{beton} was not converted from an image folder"):
        image_folder_of(str(beton))


def test_sharded_data_against_the_folder_it_was_written_from(jpeg_dataset, tmp_path, capsys):
    """`--baseline folder`: each backend that reads shards on the sharded split and on its source folder; the
    libraries used by hand ('raw', 'decode') read the source folder."""
    shards = data_path(f"torchvision{SHARDS}", jpeg_dataset / "train", tmp_path)
    assert main(["bench", "loader", "--loader", "torchvision", "--data", str(shards), "--resolutions", "32",
                 "--batch-size", "16", "--workers", "1", "--rounds", "1", "--baseline", "folder", "decode"]) == 0
    (row,) = json_rows(capsys.readouterr().out)
    assert row["images_per_s"] > 0 and row["folder_images_per_s"] > 0 and row["decode_images_per_s"] > 0
    assert main(["bench", "loader", "--loader", "torchvision", "--data", str(jpeg_dataset / "train"),
                 "--baseline", "folder"]) == 2
    assert "--baseline folder compares a sharded split" in capsys.readouterr().err
