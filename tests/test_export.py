"""`fastimagenet export`: a plain state_dict that torchvision's model class loads strictly, or a self-contained
torch.export program that a fresh Python without fastimagenet runs, with OUT.json saying how to feed it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from fastimagenet.cli import main
from fastimagenet.export import plain_state_dict
from fastimagenet.metrics import read_metrics
from tests.conftest import train

# Scores an exported .pt2 on an ImageFolder split, knowing only what OUT.json says: run by a Python that never
# imports fastimagenet (`-I`: no current directory or PYTHON* variables on its path).
_FRESH_SCORER = """
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image

program, val = Path(sys.argv[1]), Path(sys.argv[2])
info = json.loads(Path(str(program) + ".json").read_text())
model = torch.export.load(str(program)).module()
side, crop = info["eval_resolution"], info["crop_ratio"]
images, labels = [], []
for label, name in enumerate(info["classes"]):
    for path in sorted((val / name).iterdir()):
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            s = min(w, h) * crop
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            images.append(np.asarray(img.resize((side, side), Image.BILINEAR, box=box)))
        labels.append(label)
with torch.no_grad():
    predicted = model(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)).argmax(1)
print(json.dumps({"top1": (predicted == torch.tensor(labels)).float().mean().item(), "images": len(labels),
                  "fastimagenet_imported": any(m.startswith("fastimagenet") for m in sys.modules)}))
"""


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
        trained = torch.load(run / ("best-ema.pt" if extra else "best.pt"), weights_only=False)
        source = trained["ema"]["module"] if extra else trained["model"]
        assert torch.equal(model.fc.weight, source["fc.weight"])
        info = json.loads(out.with_name(out.name + ".json").read_text())
        assert info["torchvision_compatible"] and info["load"].startswith("torchvision.models.resnet18(num_classes=4)")
        assert info["classes"] == ["class_00", "class_01", "class_02", "class_03"]
        assert (info["eval_resolution"], info["crop_ratio"]) == (32, 224 / 256)


@pytest.mark.slow
def test_a_blurpool_run_exports_a_program_that_runs_without_fastimagenet(jpeg_dataset, tmp_path, capsys):
    """torchvision's ResNet has no blur layers: the plain state_dict of a BlurPool model is refused (or written
    with --allow-blurpool and labelled); the .pt2 program scores what the run scored, in a fresh process that reads
    the val images itself and knows only OUT.json."""
    run = tmp_path / "run"
    records = train("torchvision", jpeg_dataset, run, "epochs=3", "schedule.stages=0,32,16", "model.blurpool=true")
    assert main(["export", str(run), str(tmp_path / "w.pt")]) == 2
    assert "a BlurPool model (model.blurpool=true)" in capsys.readouterr().err
    assert not (tmp_path / "w.pt").exists()
    assert main(["export", str(run), str(tmp_path / "w.pt"), "--allow-blurpool"]) == 0
    info = json.loads((tmp_path / "w.pt.json").read_text())
    assert not info["torchvision_compatible"] and "blurpool=True" in info["load"]

    assert main(["export", str(run), str(tmp_path / "model.pt2")]) == 0
    info = json.loads((tmp_path / "model.pt2.json").read_text())
    best = max(records, key=lambda r: (r["val_top1"], -r["epoch"]))
    assert (info["source"]["epoch"], info["source"]["val_top1"]) == (best["epoch"], best["val_top1"])
    scorer = tmp_path / "fresh" / "score.py"
    scorer.parent.mkdir()
    scorer.write_text(_FRESH_SCORER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([sys.executable, "-I", str(scorer), str(tmp_path / "model.pt2"), str(jpeg_dataset / "val")],
                          cwd=scorer.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert not fresh["fastimagenet_imported"]
    assert fresh["images"] == best["val_images"]
    assert fresh["top1"] >= 0.9 and abs(fresh["top1"] - best["val_top1"]) <= 1 / best["val_images"]
    assert read_metrics(run) == records


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
    assert main(["export", str(tmp_path), str(tmp_path / "out.onnx"), "--checkpoint", "last"]) == 2
    assert "the output's extension picks the format" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "no" / "out.pt"), "--checkpoint", "last"]) == 2
    assert "output directory does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
