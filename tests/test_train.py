"""End to end: `fastimagenet train` on tiny data learns, and writes everything a run promises."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastimagenet import loaders
from fastimagenet import bench
from fastimagenet import train as train_module
from fastimagenet.cli import build_parser, main
from tests.conftest import PacedClock, train


def test_tiny_run_learns_with_progressive_resizing(jpeg_dataset, tmp_path):
    out = tmp_path / "run"
    metrics = train("torchvision", jpeg_dataset, out, "epochs=5", "schedule.stages=0,24,16;2,32,8")
    assert [m["resolution"] for m in metrics] == [24, 24, 32, 32, 32]
    assert [m["batch_size"] for m in metrics] == [16, 16, 8, 8, 8]
    keys = {"epoch", "resolution", "batch_size", "lr", "train_loss", "val_loss", "val_top1", "val_top5",
            "images_per_s", "epoch_time_s"}
    assert keys <= set(metrics[-1])
    assert metrics[-1]["val_top1"] >= 0.6  # 4 classes: chance is 0.25
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert (out / "config.yaml").read_text().startswith("run:\n  git_commit:")
    assert any((out / "tensorboard").iterdir())
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, weights_only=False)
        assert {"model", "optimizer", "epoch", "config"} <= set(state)
    assert not list(out.glob(".*.tmp*"))


def test_compile_makes_one_graph_per_distinct_shape(jpeg_dataset, tmp_path):
    """Static shapes: 2 training resolutions + 1 eval shape = 3 graphs, not a dynamic-shape recompile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train("torchvision", jpeg_dataset, tmp_path / "run", "epochs=3", "schedule.stages=0,24,16;1,32,16;2,24,16",
          "runtime.compile=true", "runtime.compile_backend=eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


def test_bf16_autocast_on_cpu_trains(jpeg_dataset, tmp_path, monkeypatch):
    """Every training step's logits come out of the model in bfloat16, and the losses are finite."""
    dtypes = []
    cross_entropy = F.cross_entropy
    monkeypatch.setattr(train_module, "F", SimpleNamespace(
        cross_entropy=lambda logits, *args, **kwargs: dtypes.append(logits.dtype) or cross_entropy(logits, *args,
                                                                                                   **kwargs)))
    [record] = train("synthetic", jpeg_dataset, tmp_path / "run", "epochs=1", "schedule.stages=0,16,8",
                     "runtime.precision=bf16", "loader.synthetic_samples=32", "data.num_classes=4")
    assert dtypes == [torch.bfloat16] * (32 // 8)
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])


def test_grad_accumulation_clipping_and_adamw_reach_a_real_run(jpeg_dataset, tmp_path, monkeypatch):
    """96 images in micro-batches of 8, two to an optimizer step: 6 steps an epoch, each one clipped, and AdamW's
    state counts 12 steps after 2 epochs (what each setting does is tested in test_numerics.py)."""
    clips = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda parameters, max_norm, *args, **kwargs: (
        clips.append(max_norm) or clip(parameters, max_norm, *args, **kwargs)))
    metrics = train("torchvision", jpeg_dataset, tmp_path / "run", "epochs=2", "schedule.stages=0,24,16",
                    "optim.accum_steps=2", "optim.grad_clip=1.0", "optim.name=adamw", "optim.lr=0.004")
    assert clips == [1.0] * 12
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["optimizer"]["state"]
    assert {float(s["step"]) for s in state.values()} == {12.0} and all("exp_avg_sq" in s for s in state.values())
    assert all(math.isfinite(r["train_loss"]) for r in metrics)


def test_eval_every_validates_every_nth_and_the_last_epoch(jpeg_dataset, tmp_path, capsys):
    """runtime.eval_every=2 over 3 epochs validates epochs 1 and 2 (the last); epoch 0's record has no val figures
    (of the model or the EMA), is not ranked for best.pt, and still writes last.pt."""
    out = tmp_path / "run"
    metrics = train("torchvision", jpeg_dataset, out, "epochs=3", "schedule.stages=0,24,16", "runtime.eval_every=2",
                    "optim.ema_decay=0.9")
    assert [sorted(k for k in r if "val_" in k) for r in metrics] == [
        [], *[["ema_val_loss", "ema_val_top1", "ema_val_top5", "val_images", "val_loss", "val_top1", "val_top5"]] * 2]
    printed = capsys.readouterr().out
    lines = {line.partition(":")[0]: line for line in printed.splitlines()}
    assert "val: not evaluated (runtime.eval_every)" in lines["epoch 0"] and "val_loss" in lines["epoch 1"]
    assert f"done: val top-1 {metrics[-1]['val_top1']:.2%}" in printed
    best_epoch = max(metrics[1:], key=lambda r: r["val_top1"])["epoch"]  # ties keep the earlier epoch, as max does
    assert torch.load(out / "best.pt", weights_only=False)["epoch"] == best_epoch
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 2
    assert (out / "run.png").stat().st_size > 10_000


def test_validated_epochs_depend_on_the_epoch_index_alone():
    """A resumed run validates the epochs an uninterrupted one does."""
    assert [e for e in range(7) if train_module.validates(e, 7, 3)] == [2, 5, 6]
    assert [e for e in range(4) if train_module.validates(e, 4, 1)] == [0, 1, 2, 3]


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastimagenet", "train", "optim.lrr=1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: command line: unknown config key 'optim.lrr' — did you mean 'optim.lr'?"
    result = subprocess.run([sys.executable, "-m", "fastimagenet", "train", f"data.train={tmp_path / 'nope'}",
                             "runtime.device=cpu", f"runtime.out_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "nope: data directory does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every command and sub-command of the CLI (bench, bench loader, ...), read from its parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*prefix, name)
                yield from _commands(child, (*prefix, name))


@pytest.mark.parametrize("command", [" ".join(c) for c in _commands(build_parser())])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: fastimagenet {command}")


def test_the_module_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "fastimagenet", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: fastimagenet train")


def test_bench_loader_prints_one_json_line_with_the_baseline(jpeg_dataset, capsys, monkeypatch):
    """On a clock where a batch of the loader takes 0.5 s and one of the torchvision baseline 2 s, 8 images a batch
    (96 images: 12 whole batches a pass for each): 16 and 4 images/s, 4 times faster."""
    clock = PacedClock()
    monkeypatch.setattr(bench, "time", clock)
    build, reference = loaders.build_loader, bench.torchvision_reference
    monkeypatch.setattr(loaders, "build_loader", lambda name, spec: clock.pace(build(name, spec), 0.5))
    monkeypatch.setattr(bench, "torchvision_reference", lambda *args: clock.pace(reference(*args), 2.0))
    assert main(["bench", "loader", "--loader", "torchvision", "--data", str(jpeg_dataset / "train"),
                 "--resolution", "32", "--batch-size", "8", "--workers", "1", "--rounds", "2", "--baseline"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["images_per_s"], result["torchvision_images_per_s"], result["ratio_vs_torchvision"]) == (16, 4, 4)
    assert clock.now == 3 * 12 * (0.5 + 2.0)  # an untimed pass, then 2 timed ones, of each
