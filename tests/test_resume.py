"""Checkpoints and resume: a run killed with SIGKILL mid-way and resumed ends where an uninterrupted run ends;
Ctrl-C leaves a checkpoint; best-k are kept; bad resume requests are clear errors."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from fastimagenet.checkpoint import CheckpointKeeper, atomic_torch_save
from fastimagenet.cli import main
from fastimagenet.metrics import read_metrics
from tests.conftest import TINY_RUN
from tests.processes import Started

TINY = [*TINY_RUN, "optim.lr=0.8", "schedule.lr=onecycle", "data.val_resolution=32",
        "schedule.stages=0,24,16;2,32,16", "runtime.keep_best=2", "optim.ema_decay=0.9",
        "runtime.preempt_grace_s=600"]  # a stop's checkpoint may take as long as a slow machine needs


def _args(data, out, epochs):
    return ["train", "--loader", "torchvision", f"data.train={data / 'train'}", f"data.val={data / 'val'}",
            f"runtime.out_dir={out}", f"epochs={epochs}", *TINY]


@contextmanager
def _paused_run(data, out, epochs, at: tuple[int, int], *extra) -> Iterator[Started]:
    """The run as a process of its own, held still before step at[1] of epoch at[0] (tests/step_signals.py) until
    a signal comes: a signal sent once it is ready lands exactly there, on a machine of any speed."""
    # One intra-op thread, as in the runs it is compared with, so the float arithmetic is the same.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ready = out.parent / f"{out.name}.paused"
    with Started([sys.executable, "-m", "tests.step_signals", "pause", str(at[0]), str(at[1]), str(ready),
                  *_args(data, out, epochs), *extra], out.parent / f"{out.name}.log", env) as process:
        process.wait_for(f"the run to pause before step {at[1]} of epoch {at[0]}", ready.is_file)
        yield process


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(jpeg_dataset, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    with _paused_run(jpeg_dataset, killed, 4, at=(2, 0)) as process:  # epochs 0 and 1 finished
        process.signal(signal.SIGKILL)
        assert process.finish() == -signal.SIGKILL  # it was killed mid-run, not finished
    assert [r["epoch"] for r in read_metrics(killed)] == [0, 1]

    # A write cut by a kill leaves a temporary file beside the one it was replacing: there may be none from this
    # kill (it depends on when it came), so one is planted
    (killed / ".last.pt.tmp4242").write_bytes(b"the first half of a checkpoint")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--resume", str(killed)]) == 0
        assert main(_args(jpeg_dataset, full, epochs=4)) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = read_metrics(full), read_metrics(killed)
    assert [r["epoch"] for r in b] == [0, 1, 2, 3]  # each epoch once, also one logged just before the kill
    for ra, rb in zip(a, b):
        assert (rb["resolution"], rb["batch_size"], rb["lr"]) == (ra["resolution"], ra["batch_size"], ra["lr"])
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4, abs=1e-6)
        assert rb["val_top1"] == pytest.approx(ra["val_top1"], abs=1e-9)
        assert rb["ema_val_loss"] == pytest.approx(ra["ema_val_loss"], rel=1e-4)  # the EMA resumes too
    sa, sb = (torch.load(run / "last.pt", weights_only=False) for run in (full, killed))
    for wa, wb in ((sa["model"], sb["model"]), (sa["ema"]["module"], sb["ema"]["module"])):
        for key in wa:
            assert torch.allclose(wa[key].float(), wb[key].float(), rtol=1e-4, atol=1e-6), key
    assert len(list(killed.glob("best-epoch*.pt"))) == 2  # runtime.keep_best=2
    assert not list(killed.glob(".*.tmp*"))  # the resume removed it


@pytest.mark.slow
def test_plateau_drops_resume_where_the_uninterrupted_run_drops(jpeg_dataset, tmp_path, capsys):
    """No top-1 beats the best by a threshold of 1: after the first validation every one is flat, so with patience
    1 the LR halves after epochs 1 and 2. A run killed before epoch 2 must resume at the halved LR."""
    plateau = ["schedule.lr=plateau", "schedule.plateau_patience=1", "schedule.plateau_factor=0.5",
               "schedule.plateau_threshold=1", "schedule.plateau_min_lr_ratio=0.01"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    with _paused_run(jpeg_dataset, killed, 4, (2, 0), *plateau) as process:  # epochs 0 and 1 finished
        process.signal(signal.SIGKILL)
        assert process.finish() == -signal.SIGKILL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--resume", str(killed)]) == 0
        assert main([*_args(jpeg_dataset, full, epochs=4), *plateau]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "LR x0.5 from epoch 2 (now x0.5 of the plan's)" in capsys.readouterr().out
    a, b = read_metrics(full), read_metrics(killed)
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    assert [round(r["lr"] / a[0]["lr"], 6) for r in a] == [1, 1, 0.5, 0.25]
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exports(jpeg_dataset, tmp_path):
    out = tmp_path / "run"
    with _paused_run(jpeg_dataset, out, 6, (1, 3), "schedule.stages=0,24,8") as process:  # 12 steps an epoch
        process.signal(signal.SIGINT)
        assert process.finish() == 130, process.output()[-3000:]
    assert "SIGINT: stopping after the current step" in process.output()
    state = torch.load(out / "interrupted.pt", weights_only=False)
    assert (out / "interrupted.pt").samefile(out / "last.pt")  # the stop's resumable checkpoint, named for export
    # Where it stopped, against what was written apart from the checkpoint: metrics.jsonl logged epoch 0 alone as
    # finished, and the EMA counted the optimizer steps taken.
    assert [r["epoch"] for r in read_metrics(out)] == [0]
    # It was paused before step 3 and stopped after that step: the position is step 4, whatever the machine's speed.
    assert state["epoch"] == 0 and state["position"] == {**state["position"], "epoch": 1, "step": 4}
    assert state["ema"]["updates"] == 12 + 4
    assert main(["export", str(out), str(tmp_path / "weights.pt"), "--checkpoint", "interrupted"]) == 0
    exported = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert exported.keys() == state["model"].keys()
    assert all(torch.equal(exported[key], state["model"][key]) for key in exported)
    assert json.loads((tmp_path / "weights.pt.json").read_text())["source"]["epoch"] == state["epoch"]


def test_best_k_keeps_the_best_epochs_and_best_pt_points_at_the_top(tmp_path):
    keeper = CheckpointKeeper(tmp_path, keep_best=2)
    for epoch, top1 in enumerate([0.5, 0.7, 0.6, 0.7, 0.4]):
        keeper.rank(epoch, top1)
        keeper.save({"epoch": epoch}, epoch)
    assert sorted(p.name for p in tmp_path.glob("best-epoch*.pt")) == ["best-epoch001.pt", "best-epoch003.pt"]
    assert keeper.ranking == [(0.7, 1), (0.7, 3)]  # a tie keeps the earlier epoch first
    assert torch.load(tmp_path / "best.pt")["epoch"] == 1
    assert torch.load(tmp_path / "last.pt")["epoch"] == 4


def test_a_kill_between_last_pt_and_its_best_link_is_mended_on_resume(tmp_path):
    """last.pt of a best epoch was written, then the process died before linking it as best-epochNNN.pt: the
    resumed keeper links it from last.pt (still that epoch's checkpoint) before training on."""
    keeper = CheckpointKeeper(tmp_path, keep_best=2)
    keeper.rank(0, 0.5)
    keeper.save({"epoch": 0}, 0)
    keeper.rank(1, 0.9)
    atomic_torch_save({"epoch": 1, "best_ranking": keeper.ranking}, tmp_path / "last.pt")  # killed here
    resumed = CheckpointKeeper(tmp_path, 2, torch.load(tmp_path / "last.pt")["best_ranking"])
    resumed.link_best(1)
    assert torch.load(tmp_path / "best-epoch001.pt")["epoch"] == 1 and torch.load(tmp_path / "best.pt")["epoch"] == 1
    assert (tmp_path / "best-epoch000.pt").is_file()  # still among the 2 best


def test_resume_refuses_what_it_cannot_continue(jpeg_dataset, tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(_args(jpeg_dataset, out, epochs=1) + ["schedule.stages=0,24,16"]) == 0
    assert main(["train", "--resume", str(out)]) == 2
    assert "already finished its 1 epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--config", "demo_fashion_mnist"]) == 2
    assert "drop --config" in capsys.readouterr().err
    (out / "last.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(out)]) == 2
    assert "last.pt: not a readable checkpoint" in capsys.readouterr().err
    (out / "last.pt").unlink()
    assert main(["train", "--resume", str(out)]) == 2
    assert "no finished epoch to resume from" in capsys.readouterr().err
