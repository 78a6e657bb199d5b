"""Stopping on a signal and resuming: a stop inside an epoch writes a checkpoint that a resume continues from at
the same step, ending with the weights of a run never stopped; `--resume auto` restarts with the same command line."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch

from fastimagenet import loaders
from fastimagenet.cli import main
from fastimagenet.metrics import read_metrics
from tests.conftest import TINY_RUN, data_path
from tests.processes import Started, fastimagenet, run_to_end
from tests.step_signals import signalling_build

RUN = [*TINY_RUN, "optim.lr=0.4", "schedule.lr=onecycle", "data.val_resolution=32", "optim.ema_decay=0.9",
       "schedule.stages=0,24,8;1,32,8", "epochs=3",
       "runtime.preempt_grace_s=600"]  # a stop's checkpoint may take as long as a slow machine needs


def _args(loader, data, out, *extra, train=None, val=None):
    train, val = train or data / "train", val or data / "val"
    return ["train", "--loader", loader, f"data.train={train}", f"data.val={val}", f"runtime.out_dir={out}", *RUN,
            *extra]


EVERY_BACKEND = ["torchvision", "dali", "synthetic", pytest.param("ffcv", marks=pytest.mark.slow)]


def _run_args(loader, data, out, *extra):
    """A run on what `loader` reads of the dataset (`data`: ffcv's are .beton files) or, synthetic, of its shape."""
    synthetic = ["loader.synthetic_samples=96", "data.num_classes=4"] if loader == "synthetic" else []
    return _args(loader, None, out, *synthetic, *extra, train=data["train"], val=data["val"])


@pytest.fixture(scope="module")
def unstopped(jpeg_dataset, tmp_path_factory):
    """unstopped(loader) -> (its data, the directory of a 3-epoch run never stopped), each run once per module."""
    runs = {}

    def run(loader):
        if loader not in runs:
            root = tmp_path_factory.mktemp(f"unstopped-{loader}")
            data = {split: data_path(loader, jpeg_dataset / split, root) for split in ("train", "val")}
            assert main(_run_args(loader, data, root / "run")) == 0
            runs[loader] = data, root / "run"
        return runs[loader]

    return run


def _assert_ends_as(full, resumed):
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
    sa, sb = (torch.load(run / "last.pt", weights_only=False) for run in (full, resumed))
    for wa, wb in ((sa["model"], sb["model"]), (sa["ema"]["module"], sb["ema"]["module"])):
        for key in wa:
            assert torch.allclose(wa[key].float(), wb[key].float(), rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("loader", EVERY_BACKEND)
def test_a_stop_inside_an_epoch_resumes_at_that_step_and_ends_as_an_unstopped_run(loader, unstopped, tmp_path,
                                                                                  monkeypatch, capsys):
    data, full = unstopped(loader)
    stopped = tmp_path / "stopped"
    build = loaders.build_loader
    monkeypatch.setattr(loaders, "build_loader", signalling_build(build, 1, 4, signal.SIGTERM))
    assert main(_run_args(loader, data, stopped)) == 128 + signal.SIGTERM
    err = capsys.readouterr()
    assert "SIGTERM: stopping after the current step" in err.err and "stopped in epoch 1 at step 6" in err.out
    state = torch.load(stopped / "last.pt", weights_only=False)
    assert state["position"]["epoch"] == 1 and state["position"]["step"] == 6 and state["epoch"] == 0
    assert (stopped / "interrupted.pt").samefile(stopped / "last.pt")
    monkeypatch.setattr(loaders, "build_loader", build)

    assert main(["train", "--resume", str(stopped)]) == 0
    assert "(resuming at epoch 1, step 6)" in capsys.readouterr().out
    _assert_ends_as(full, stopped)
    assert not (stopped / "interrupted.pt").exists()  # retired once an epoch finished after the resume


# A run whose clock moves a minute at every reading (runtime.checkpoint_every_min=1 writes last.pt at each step),
# killed with SIGKILL right after the in-epoch checkpoint at epoch 1, step 3.
_KILLED_AFTER_AN_IN_EPOCH_CHECKPOINT = """
import os, signal, sys, types
sys.path.insert(0, {root!r})
from fastimagenet import train
from fastimagenet.checkpoint import CheckpointKeeper
from fastimagenet.cli import main

minutes = iter(range(10**9))
train.time = types.SimpleNamespace(perf_counter=lambda: 60.0 * next(minutes))
save_position = CheckpointKeeper.save_position


def save_then_die(self, state, stopped):
    save_position(self, state, stopped)
    if state["position"] == {{**state["position"], "epoch": 1, "step": 3}}:
        os.kill(os.getpid(), signal.SIGKILL)


CheckpointKeeper.save_position = save_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("loader", EVERY_BACKEND)
def test_kill_9_after_an_in_epoch_checkpoint_resumes_there_and_ends_as_an_unstopped_run(loader, unstopped, tmp_path):
    """Every run here is a process of its own, the unstopped one too: a run inside the test process may differ in
    the last digits (thread settings that earlier tests leave behind)."""
    data, _ = unstopped(loader)
    full = tmp_path / "full"
    process = run_to_end(fastimagenet(*_run_args(loader, data, full)), tmp_path / "full.log")
    assert process.returncode == 0, process.stdout[-3000:]
    driver = tmp_path / "driver.py"
    driver.write_text(_KILLED_AFTER_AN_IN_EPOCH_CHECKPOINT.format(root=str(Path(__file__).resolve().parents[1])))
    killed = tmp_path / "killed"
    process = run_to_end([sys.executable, str(driver), *_run_args(loader, data, killed,
                                                                  "runtime.checkpoint_every_min=1")],
                         tmp_path / "killed.log")
    assert process.returncode == -signal.SIGKILL, process.stdout[-3000:]
    assert torch.load(killed / "last.pt", weights_only=False)["position"]["step"] == 3
    assert [r["epoch"] for r in read_metrics(killed)] == [0]
    resumed = run_to_end(fastimagenet("train", "--resume", str(killed)), tmp_path / "resumed.log")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "(resuming at epoch 1, step 3)" in resumed.stdout
    _assert_ends_as(full, killed)


@pytest.mark.slow
def test_sigterm_to_a_real_process_checkpoints_and_a_second_signal_exits_at_once(jpeg_dataset, tmp_path):
    out = tmp_path / "run"
    with Started(fastimagenet(*_args("torchvision", jpeg_dataset, out, "epochs=40")), tmp_path / "run.log") as process:
        process.wait_for_line("epoch 0:")  # the first epoch has ended: the loop is running
        process.signal(signal.SIGTERM)
        assert process.finish() == 128 + signal.SIGTERM, process.output()[-2000:]
    assert "continue with: fastimagenet train --resume" in process.output()
    torch.load(out / "last.pt", weights_only=False)  # whole

    again = tmp_path / "again"
    with Started(fastimagenet(*_args("torchvision", jpeg_dataset, again, "epochs=40", "runtime.preempt_grace_s=60")),
                 tmp_path / "again.log") as process:
        # the epoch's line comes just before its checkpoint: a second signal while that is written leaves none
        process.wait_for_line("epoch 0:")
        process.wait_for("epoch 0's checkpoint", (again / "last.pt").exists)
        process.signal(signal.SIGUSR1)
        process.signal(signal.SIGUSR1)
        assert process.finish() == 128 + signal.SIGUSR1
    torch.load(again / "last.pt", weights_only=False)  # the previous checkpoint, whole


def test_resume_auto_starts_continues_and_knows_when_it_is_done(jpeg_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    command = [*_args("torchvision", jpeg_dataset, out), "--resume", "auto"]
    build = loaders.build_loader
    monkeypatch.setattr(loaders, "build_loader", signalling_build(build, 0, 3, signal.SIGTERM))
    assert main(command) == 128 + signal.SIGTERM  # a fresh start, stopped in epoch 0
    monkeypatch.setattr(loaders, "build_loader", build)
    assert main(command) == 0  # the same command line continues it
    assert "(resuming at epoch 0, step 5)" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2]
    assert main(command) == 2
    assert "already finished its 3 epochs" in capsys.readouterr().err
    assert main([*command, "optim.lr=0.5"]) == 2  # a restart must repeat the run's own settings
    assert "'optim.lr' (0.4 -> 0.5)" in capsys.readouterr().err


def test_preemption_settings_are_checked():
    from fastimagenet.common.errors import UserError
    from fastimagenet.config import load_config

    with pytest.raises(UserError, match="'runtime.checkpoint_every_min' must be 0 \\(off\\) or at least 1"):
        load_config(None, ["runtime.checkpoint_every_min=0.5"])
    with pytest.raises(UserError, match="'runtime.preempt_signal' must be one of"):
        load_config(None, ["runtime.preempt_signal=SIGKILL"])
