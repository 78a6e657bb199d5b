"""`fastimagenet export` writes a plain state_dict that torchvision's model class loads strictly."""

from __future__ import annotations

import torch
import torchvision

from fastimagenet.cli import main
from fastimagenet.export import plain_state_dict


def test_exported_weights_load_into_torchvision_resnet18(jpeg_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--loader", "torchvision", f"data.train={jpeg_dataset / 'train'}",
                 f"data.val={jpeg_dataset / 'val'}", f"runtime.out_dir={run}", "model.arch=resnet18",
                 "runtime.compile=false", "runtime.device=cpu", "epochs=1", "schedule.stages=0,32,32",
                 "loader.workers=1", "optim.ema_decay=0.9"]) == 0
    for extra in ([], ["--ema"]):
        out = tmp_path / f"resnet18{'-ema' if extra else ''}.pt"
        assert main(["export", str(run), str(out), *extra]) == 0
        weights = torch.load(out, map_location="cpu", weights_only=True)  # plain tensors only
        model = torchvision.models.resnet18(num_classes=4)
        model.load_state_dict(weights, strict=True)
        trained = torch.load(run / "best.pt", weights_only=False)
        source = trained["ema"]["module"] if extra else trained["model"]
        assert torch.equal(model.fc.weight, source["fc.weight"])


def test_wrapper_prefixes_are_stripped():
    weights = {"module._orig_mod.fc.weight": torch.ones(2), "_orig_mod.conv1.weight": torch.zeros(1)}
    assert list(plain_state_dict(weights)) == ["fc.weight", "conv1.weight"]


def test_export_reports_bad_input(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out.pt")]) == 2
    assert "nope: run directory not found" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "out.pt")]) == 2
    assert "best.pt: checkpoint not found" in capsys.readouterr().err
    (tmp_path / "best.pt").write_bytes(b"\x00garbage")
    assert main(["export", str(tmp_path), str(tmp_path / "out.pt")]) == 2
    assert "best.pt: not a readable checkpoint" in capsys.readouterr().err
    torch.save({"model": {}, "epoch": 0}, tmp_path / "last.pt")
    assert main(["export", str(tmp_path), str(tmp_path / "out.pt"), "--checkpoint", "last", "--ema"]) == 2
    assert "kept no EMA weights" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "no" / "out.pt"), "--checkpoint", "last"]) == 2
    assert "output directory does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
