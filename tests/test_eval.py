"""`fastimagenet eval`: a finished run, a checkpoint or an exported state_dict, scored on any split."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastimagenet.cli import main
from tests.conftest import train


@pytest.fixture(scope="module")
def finished_run(jpeg_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    metrics = train("torchvision", jpeg_dataset, out, "epochs=2", "schedule.stages=0,24,16;1,32,16",
                    "optim.ema_decay=0.5", "data.val_batch_size=12")
    return out, metrics


def _eval(capsys, *args) -> dict:
    source, *options = map(str, args)
    assert main(["eval", source, "loader.workers=1", *options]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("eval ") and "top-1" in lines[-2]
    return json.loads(lines[-1])


def test_eval_reproduces_the_runs_last_score_with_its_own_settings(finished_run, jpeg_dataset, capsys):
    run, metrics = finished_run
    result = _eval(capsys, run, "--data", jpeg_dataset / "val", "--checkpoint", "last")
    assert result["top1"] == metrics[-1]["val_top1"] and result["top5"] == metrics[-1]["val_top5"]
    assert result["loss"] == pytest.approx(metrics[-1]["val_loss"], rel=1e-6)
    assert result["images"] == 32 and result["resolution"] == 32 and result["images_per_s"] > 0
    ema = _eval(capsys, run, "--data", jpeg_dataset / "val", "--checkpoint", "last", "--ema")
    assert ema["top1"] == metrics[-1]["ema_val_top1"]


def test_eval_changes_resolution_crop_and_tta_and_writes_per_class(finished_run, jpeg_dataset, capsys, tmp_path):
    run, _ = finished_run
    csv = tmp_path / "per_class.csv"
    result = _eval(capsys, run, "--data", jpeg_dataset / "val", "--resolution", 48, "--crop-ratio", 1.0,
                   "--tta-flip", "--per-class", csv)
    assert (result["resolution"], result["crop_ratio"], result["tta_flip"]) == (48, 1.0, True)
    rows = csv.read_text().splitlines()
    assert rows[0] == "class,images,top1" and len(rows) == 5
    images = [int(row.split(",")[1]) for row in rows[1:]]
    hits = sum(float(row.split(",")[2]) * n for row, n in zip(rows[1:], images))
    assert sum(images) == 32 and hits == pytest.approx(result["top1"] * 32)


def test_eval_of_a_checkpoint_file_and_of_an_export(finished_run, jpeg_dataset, capsys, tmp_path):
    run, metrics = finished_run
    from_file = _eval(capsys, run / "last.pt", "--data", jpeg_dataset / "val")
    assert from_file["top1"] == metrics[-1]["val_top1"]
    state = torch.load(run / "last.pt", weights_only=False)
    torch.save(state["model"], tmp_path / "weights.pt")
    exported = _eval(capsys, tmp_path / "weights.pt", "--arch", "resnet10_small", "--data", jpeg_dataset / "val",
                     "--resolution", 32, "--crop-ratio", 0.875, "--batch-size", 12)
    assert exported["top1"] == metrics[-1]["val_top1"]


def test_eval_class_mismatch_and_missing_arch_are_clear_errors(finished_run, jpeg_dataset, capsys, tmp_path):
    run, _ = finished_run
    other = tmp_path / "val"
    shutil.copytree(jpeg_dataset / "val", other)
    (other / "class_00").rename(other / "zebra")
    assert main(["eval", str(run), "--data", str(other)]) == 2
    assert "classes zebra are not among the 4 classes" in capsys.readouterr().err
    torch.save(torch.load(run / "last.pt", weights_only=False)["model"], tmp_path / "weights.pt")
    assert main(["eval", str(tmp_path / "weights.pt"), "--data", str(jpeg_dataset / "val")]) == 2
    assert "add --arch" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "weights.pt"), "--arch", "resnet18", "--data", str(jpeg_dataset / "val")]) == 2
    assert "do not fit resnet18" in capsys.readouterr().err
