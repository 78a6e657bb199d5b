"""`fastimagenet bench train`: the training step fed by a loader against the same step fed by synthetic data."""

from __future__ import annotations

import json

import pytest
import torch

from fastimagenet import loaders
from fastimagenet import bench
from fastimagenet.bench import _TrainFeed
from fastimagenet.cli import main
from fastimagenet.config import load_config
from fastimagenet.plan import build_plan
from fastimagenet.runtime import resolve_runtime
from fastimagenet.training_setup import build_training
from tests.conftest import TINY_RUN, PacedClock, data_path

TWO_STAGES = ["epochs=4", "schedule.stages=0,24,16;2,32,8"]  # 4 epochs, 2 distinct (resolution, batch) shapes


@pytest.fixture
def one_thread():
    """One torch thread beside the loader's worker: on 2 cores, two threads spinning against a worker make the
    steps many times slower (the figures do not matter here, only the test's time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_one_row_per_distinct_shape_with_the_efficiency_of_the_printed_figures(jpeg_dataset, capsys, one_thread,
                                                                                 monkeypatch):
    """On a clock where a batch of the torchvision loader takes 0.5 s and one of the synthetic loader 0.25 s: 16
    images a batch give 32 and 64 images/s, 8 images 16 and 32; the loader is half as fast as synthetic data."""
    clock = PacedClock()
    monkeypatch.setattr(bench, "time", clock)
    build = loaders.build_loader
    monkeypatch.setattr(loaders, "build_loader", lambda name, spec: clock.pace(
        build(name, spec), {"torchvision": 0.5, "synthetic": 0.25}[name]))
    # 96 images: 6 batches of 16 per epoch, and a pass of 1 + 7 steps wraps into the next epoch
    assert main(["bench", "train", "--loader", "torchvision", "--steps", "7", "--rounds", "1",
                 f"data.train={jpeg_dataset / 'train'}", *TINY_RUN, *TWO_STAGES]) == 0
    out = capsys.readouterr().out
    rows = json_rows(out)
    assert [(row["resolution"], row["batch_size"]) for row in rows] == [(24, 16), (32, 8)]
    assert [(row["images_per_s"], row["synthetic_images_per_s"]) for row in rows] == [(32, 64), (16, 32)]
    for row in rows:
        assert row["loader_efficiency"] == 0.5
        assert row["loader"] == "torchvision" and row["steps"] == 7 and row["device"] == "cpu"
    table = out.splitlines()[-3:]
    assert "images/s" in table[0] and "px" in table[0]
    assert [line.split()[:2] for line in table[1:]] == [["24", "16"], ["32", "8"]]


def test_each_pass_starts_a_new_epoch_and_wraps_when_the_loader_is_shorter(jpeg_dataset, one_thread, monkeypatch):
    cfg = load_config(None, [f"data.train={jpeg_dataset / 'train'}", *TINY_RUN, "epochs=1", "schedule.stages=0,32,32"])
    run = build_training(cfg, build_plan(cfg), resolve_runtime(cfg), with_val=False)
    epochs = []
    set_epoch = run.train_loader.set_epoch
    run.train_loader.set_epoch = lambda epoch: (epochs.append(epoch), set_epoch(epoch))
    clock = PacedClock()
    monkeypatch.setattr(bench, "time", clock)
    run.train_loader = clock.pace(run.train_loader, 0.5)
    feed = _TrainFeed(run, steps=4)  # 96 images: 3 batches of 32 an epoch, a pass needs 5
    feed.reconfigure(run.plan.rows[0])
    assert feed.timed_pass() == 32 / 0.5  # the 4 timed steps: the untimed first one is left out
    assert clock.now == 5 * 0.5 and epochs == [0, 1]  # 5 batches: 3 of epoch 0, 2 of epoch 1
    assert feed.timed_pass() == 64
    assert epochs == [0, 1, 2, 3]  # a new epoch, not the rest of the last one


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "bench train: --steps must be at least 1, got 0"),
    (["--rounds", "0"], "bench train: --rounds must be at least 1, got 0"),
    (["loader.name=nope"], "'loader.name' must be one of torchvision, synthetic, dali, ffcv, got 'nope'"),
    (["data.train="], "no train data given: set data.train"),
])
def test_bad_input_is_a_clear_error(args, message, jpeg_dataset, capsys):
    argv = ["bench", "train", "--loader", "torchvision", f"data.train={jpeg_dataset / 'train'}", *TINY_RUN, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_an_unknown_loader_flag_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "train", "--loader", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 50)" in text and "(default: 3)" in text and "key=value" in text


# ---------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", loaders.NAMES)
def test_bench_train_on_cuda(name, jpeg_dataset, tmp_path, capsys):
    """What a user runs first on a GPU: every installed loader against synthetic data, compiled, under bf16."""
    train = data_path(name, jpeg_dataset / "train", tmp_path)
    assert main(["bench", "train", "--loader", name, "--steps", "5", "--rounds", "2", f"data.train={train}",
                 *TINY_RUN, *TWO_STAGES, "runtime.device=cuda", "runtime.compile=true", "data.num_classes=4"]) == 0
    rows = json_rows(capsys.readouterr().out)
    assert [(row["resolution"], row["batch_size"]) for row in rows] == [(24, 16), (32, 8)]
    assert all(row["device"].startswith("cuda") and row["loader_efficiency"] > 0 for row in rows)

