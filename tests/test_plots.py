"""run.png: drawn from a run directory's metrics.jsonl and config.yaml, and errors for directories without them."""

from __future__ import annotations

import json

from PIL import Image

from fastimagenet.cli import main
from fastimagenet.config import load_config, save_config


def _run_dir(tmp_path, records, extra=()):
    cfg = load_config(None, ["epochs=4", "schedule.stages=0,128,512;2,192,256", "schedule.warmup=0.1", *extra])
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def _record(epoch, **extra):
    return {"epoch": epoch, "resolution": 128, "batch_size": 512, "lr": 0.1, "train_loss": 3 - epoch,
            "val_loss": 2.5 - epoch / 2, "val_top1": 0.2 * epoch, "val_top5": 0.25 * (epoch + 1),
            "images_per_s": 1000.0 + epoch, "epoch_time_s": 60.0, "tflops": 24.0, **extra}


def test_plot_command_writes_a_png_with_every_panel(tmp_path, capsys):
    records = [_record(e, mfu=0.3, gpu_mem_gib=20.5, ema_val_loss=2.0, ema_val_top1=0.1 * e) for e in range(3)]
    run = _run_dir(tmp_path, records)
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "run.png")
    with Image.open(run / "run.png") as image:
        assert image.format == "PNG" and image.size == (1500, 850)
    assert not list(run.glob(".*tmp"))


def test_plot_without_optional_columns(tmp_path):
    run = _run_dir(tmp_path, [_record(0)], ["schedule.lr=step"])
    assert main(["plot", str(run)]) == 0
    assert (run / "run.png").stat().st_size > 10_000


def test_plot_reports_what_is_missing(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "not a run directory (needs metrics.jsonl and config.yaml)" in capsys.readouterr().err
    _run_dir(tmp_path, [])
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl: no finished epoch to plot yet" in capsys.readouterr().err


def test_plot_of_epochs_without_val_figures(tmp_path):
    """runtime.eval_every: a run plotted before its first validated epoch has no val_* figures at all."""
    unvalidated = {k: v for k, v in _record(0).items() if not k.startswith("val_")}
    run = _run_dir(tmp_path, [unvalidated], ["runtime.eval_every=2"])
    assert main(["plot", str(run)]) == 0
    assert (run / "run.png").stat().st_size > 10_000
