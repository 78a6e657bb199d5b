"""`bench loader --baseline ffcv`: raw FFCV on a .beton of the same images, converted from a folder when needed."""

from __future__ import annotations

import json
import tempfile

import pytest

from fastimagenet.cli import main


@pytest.mark.slow
def test_ffcv_baseline_converts_a_folder_into_a_temporary_beton(jpeg_dataset, tmp_path, monkeypatch, capsys):
    # a temporary directory of the test's own: another run on the machine makes its own scratch files meanwhile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert main(["bench", "loader", "--loader", "torchvision", "--data", str(jpeg_dataset / "train"),
                 "--resolution", "32", "--batch-size", "8", "--workers", "1", "--rounds", "2",
                 "--baseline", "torchvision", "ffcv"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ffcv_images_per_s"] > 0 and result["torchvision_images_per_s"] > 0
    assert len(result["round_ratios_vs_ffcv"]) == len(result["round_ratios_vs_torchvision"]) == 2
    assert not list(tmp_path.glob("bench-loader-*"))  # the .beton went with its temporary directory


def test_a_torchvision_baseline_for_a_beton_without_a_source_folder_is_a_clear_error(tmp_path):
    from fastimagenet.bench import image_folder_of
    from fastimagenet.common.errors import UserError
    from fastimagenet.dataset_tools.convert import write_sidecar

    beton = tmp_path / "train.beton"
    write_sidecar(beton, ["a", "b"], 2, origin="arrays")  # as the demo writes its Fashion-MNIST files
    with pytest.raises(UserError, match=f"{beton} was not converted from an image folder"):
        image_folder_of(str(beton))
