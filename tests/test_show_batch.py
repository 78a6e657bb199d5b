"""`fastimagenet show-batch`: the PNG is the loader's real first batch, tile for tile, for every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastimagenet import show_batch as show_batch_module
from fastimagenet.cli import main
from fastimagenet.show_batch import BORDER, CAPTION, first_batch, tile_origin
from tests.conftest import data_path


@pytest.mark.parametrize("name", ["torchvision", "dali", "ffcv"])
@pytest.mark.parametrize("split", ["--train", "--val"])
def test_the_grid_is_the_loaders_first_batch(name, split, jpeg_dataset, tmp_path, capsys, monkeypatch):
    drawn = []  # what the loader delivered, as show-batch received it

    def recording_first_batch(*args):
        drawn.append(first_batch(*args))
        return drawn[-1]

    monkeypatch.setattr(show_batch_module, "first_batch", recording_first_batch)
    folder = jpeg_dataset / ("train" if split == "--train" else "val")
    data = data_path(name, folder, tmp_path)
    out = tmp_path / "batch.png"
    overrides = ["loader.workers=1", "loader.dali.device=cpu"]
    assert main(["show-batch", "--loader", name, "--data", str(data), "--resolution", "40", "--batch-size", "10",
                 split, "--out", str(out), *overrides]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape == (2 * (40 + CAPTION + BORDER) + BORDER, 8 * (40 + BORDER) + BORDER, 3)  # 8 + 2 tiles
    [(images, labels, classes)] = drawn
    assert images.shape == (10, 3, 40, 40) and images.dtype == torch.uint8
    for i in range(10):
        left, top = tile_origin(i, 8, 40)
        tile = torch.from_numpy(sheet[top : top + 40, left : left + 40].copy()).permute(2, 0, 1)
        assert torch.equal(tile, images[i])
    assert sorted(set(classes)) == classes and len(classes) == 4


def test_show_batch_wants_a_png(jpeg_dataset, tmp_path, capsys):
    assert main(["show-batch", "--data", str(jpeg_dataset / "train"), "--out", str(tmp_path / "b.jpg")]) == 2
    assert "b.jpg: show-batch writes a PNG" in capsys.readouterr().err
