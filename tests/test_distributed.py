"""Data-parallel training on CPU with gloo and 2 processes, for every loader backend: each rank sees its own shard
(no sample twice in an epoch), the ranks end with identical weights, and the run matches a 1-process run with the
same global batch."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fastimagenet import loaders
from fastimagenet import training_setup as train_module
from fastimagenet.common.errors import UserError
from fastimagenet.config import load_config
from fastimagenet.distributed import env_from_torchrun
from fastimagenet.metrics import read_metrics
from fastimagenet.train import fit
from tests.conftest import TINY_RUN, data_path
from tests.processes import ROOT, Started, run_to_end

TINY = [*TINY_RUN, "optim.label_smoothing=0", "optim.lr=0.4", "schedule.lr=cosine", "schedule.stages=0,32,8",
        "epochs=2", "loader.synthetic_samples=16", "data.num_classes=16"]


def _store() -> torch.distributed.TCPStore:
    """Where the spawned ranks meet, as torchrun's workers meet at its agent's store: bound to a port the OS gives it
    as it binds (0), so no port is picked first and bound later, when another process may have taken it."""
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


class _RecordingLoader:
    """Passes batches through and notes the labels of each epoch."""

    def __init__(self, inner):
        self.inner, self.epochs = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        labels = []
        self.epochs.append(labels)
        for images, batch_labels in self.inner:
            labels += batch_labels.tolist()
            yield images, batch_labels


def _instrumented_fit(overrides: list[str]) -> dict:
    """fit() that also returns the labels each epoch trained on and the final weights of this process."""
    seen = {}
    build_loader, wrap_ddp = loaders.build_loader, train_module.wrap_ddp

    def recording_build(name, spec):
        loader = build_loader(name, spec)
        if spec.train:
            loader = seen["train"] = _RecordingLoader(loader)
        return loader

    def capturing_wrap(model, *args):
        seen["model"] = model
        return wrap_ddp(model, *args)

    class CapturedEma(train_module.ModelEma):
        def __init__(self, *args):
            super().__init__(*args)
            seen["ema"] = self

    model_ema = train_module.ModelEma
    loaders.build_loader, train_module.wrap_ddp, train_module.ModelEma = recording_build, capturing_wrap, CapturedEma
    try:
        record = fit(load_config(None, overrides))
    finally:
        loaders.build_loader, train_module.wrap_ddp, train_module.ModelEma = build_loader, wrap_ddp, model_ema
    params = {k: v.detach().clone() for k, v in seen["model"].named_parameters()}
    buffers = {k: v.detach().clone() for k, v in seen["model"].named_buffers()}
    ema = {k: v.detach().clone() for k, v in seen["ema"].module.state_dict().items()} if "ema" in seen else None
    # where each gradient lives after the last step: None once dropped, else the storage it is a view of
    grads = [p.grad.untyped_storage().data_ptr() if p.grad is not None else None for p in seen["model"].parameters()]
    return {"record": record, "labels": seen["train"].epochs, "params": params, "buffers": buffers, "ema": ema,
            "grad_storages": grads}


def _rank_main(rank: int, world_size: int, port: int, overrides: list[str], result_dir: str) -> None:
    # torchrun's variables, with its agent's store (the test's) at MASTER_ADDR:MASTER_PORT: every rank a client of it
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)  # 2 processes on 2 cores
    torch.save(_instrumented_fit(overrides), Path(result_dir) / f"rank{rank}.pt")


def _overrides(name, data, out_dir):
    # the backend that makes its data up (the quickest) also runs with gradient accumulation: DDP skips the
    # all-reduce on the first micro-step (no_sync)
    extra = [] if loaders.reads(name) else ["optim.accum_steps=2"]
    return [f"loader.name={name}", f"data.train={data}", f"data.val={data}", f"runtime.out_dir={out_dir}", *TINY,
            *extra]


@pytest.mark.slow
@pytest.mark.parametrize("name", loaders.NAMES)
def test_two_processes_shard_agree_and_match_one_process(name, one_per_class, tmp_path):
    data = data_path(name, one_per_class, tmp_path)  # 16 samples, one per class: a label names its sample
    torch.manual_seed(0)
    single = _instrumented_fit(_overrides(name, data, tmp_path / "run1"))
    store = _store()
    mp.spawn(_rank_main, args=(2, store.port, _overrides(name, data, tmp_path / "run2"), str(tmp_path)),
             nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    for key, tensor in ranks[0]["params"].items():  # DDP keeps the replicas identical
        assert torch.equal(tensor, ranks[1]["params"][key]), key
    assert len(ranks[0]["labels"]) == len(ranks[1]["labels"]) == 2
    for epoch in range(2):
        first, second = ranks[0]["labels"][epoch], ranks[1]["labels"][epoch]
        assert len(first) == len(second) == 8  # each rank takes half of the global batch of 8, 2 steps
        if loaders.reads(name):  # a backend that makes its images up has no per-sample labels to compare
            assert len(set(first)) == 8 and not set(first) & set(second)  # no sample twice in the epoch
            assert sorted(first + second) == sorted(single["labels"][epoch]) == list(range(16))

    # Same global batches, gradients averaged over the ranks: the run matches the 1-process run. Per-rank
    # BatchNorm statistics (4 images instead of 8) are the only difference, hence the tolerance.
    one, two = read_metrics(tmp_path / "run1"), read_metrics(tmp_path / "run2")
    assert len(two) == 2  # rank 0 alone writes the metrics
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)
        assert b["val_images"] == a["val_images"] == 16  # every validation sample counted exactly once
    for key, tensor in single["params"].items():
        assert torch.allclose(ranks[0]["params"][key], tensor, atol=0.05), key
    same = lambda record: {k: v for k, v in record.items() if k != "epoch_time_s"}  # noqa: E731 - own clocks
    assert same(ranks[0]["record"]) == same(ranks[1]["record"])  # reduced metrics: every rank reports the same


@pytest.mark.slow
def test_every_rank_drops_the_plateau_lr_at_the_same_epoch(one_per_class, tmp_path):
    """The drop reads the validation figures, which every rank holds alike after their all-reduce: the replicas
    keep one LR (their weights stay identical) and drop it after epoch 1 (no top-1 beats a threshold of 1)."""
    overrides = _overrides("synthetic", one_per_class, tmp_path / "run") + [
        "epochs=3", "schedule.lr=plateau", "schedule.plateau_patience=1", "schedule.plateau_factor=0.5",
        "schedule.plateau_threshold=1"]
    store = _store()
    mp.spawn(_rank_main, args=(2, store.port, overrides, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    lrs = [record["lr"] for record in read_metrics(tmp_path / "run")]
    assert lrs[2] == pytest.approx(lrs[1] / 2) and ranks[0]["record"]["lr"] == ranks[1]["record"]["lr"] == lrs[2]
    for key, tensor in ranks[0]["params"].items():
        assert torch.equal(tensor, ranks[1]["params"][key]), key


@pytest.mark.slow
def test_replicas_end_with_the_same_bn_statistics_and_the_same_ema(one_per_class, tmp_path):
    """Each rank updates BatchNorm statistics (and the EMA of them) from its own shard; both are averaged over the
    ranks before evaluation, so every rank evaluates, and rank 0 saves, the same models."""
    overrides = _overrides("synthetic", one_per_class, tmp_path / "run") + ["optim.ema_decay=0.5"]
    store = _store()
    mp.spawn(_rank_main, args=(2, store.port, overrides, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    running = [key for key in ranks[0]["buffers"] if key.endswith("running_mean")]
    assert running
    for key in running:
        assert torch.equal(ranks[0]["buffers"][key], ranks[1]["buffers"][key]), key
    for key, tensor in ranks[0]["ema"].items():
        assert torch.equal(tensor, ranks[1]["ema"][key]), key
    # The gradients stayed views into DDP's one bucket (this model's are < 1 MB), zeroed in place, never dropped
    assert [len(set(rank["grad_storages"])) for rank in ranks] == [1, 1] and None not in ranks[0]["grad_storages"]


@pytest.mark.slow
def test_torchrun_cli_trains_with_two_processes(jpeg_dataset, tmp_path):
    """The documented command (here with DDP's static graph)."""
    out = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
               "-m", "fastimagenet", "train", "--loader", "torchvision", f"data.train={jpeg_dataset / 'train'}",
               f"data.val={jpeg_dataset / 'val'}", f"runtime.out_dir={out}", *TINY, "data.num_classes=0",
               "schedule.stages=0,32,16", "runtime.ddp_static_graph=true"]
    result = run_to_end(command, tmp_path / "torchrun.log", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("run directory:") == 1  # only rank 0 prints
    assert "x 2 process(es)" in result.stdout
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert all(m["val_images"] == 32 for m in metrics)
    assert (out / "run.png").is_file() and (out / "last.pt").is_file()


# A process of a torchrun attempt: forms the process group from torchrun's environment and all-reduces once.
_ATTEMPT_PROCESS = """
import torch
from fastimagenet.distributed import env_from_torchrun, init_process_group, shutdown
init_process_group(env_from_torchrun(), torch.device("cpu"))
torch.distributed.all_reduce(torch.ones(1))
shutdown()
"""


@pytest.mark.slow
def test_each_torchrun_attempt_forms_its_process_group_under_keys_of_its_own(tmp_path):
    """torchrun's agent serves one store for all the restarts of a job, where a process group leaves its members'
    addresses: a restart reading those of the failed attempt (dead processes) cannot form its group. Two attempts,
    each against a store of its own standing in for the agent's (so neither meets the other's leftovers), write
    disjoint sets of keys."""
    stores = [torch.distributed.TCPStore("127.0.0.1", 0, is_master=True) for _ in range(2)]
    with ExitStack() as running:
        processes = [running.enter_context(Started([sys.executable, "-c", _ATTEMPT_PROCESS],
                                                   tmp_path / f"attempt{attempt}-rank{rank}.log", env={
            **os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RESTART_COUNT": str(attempt), "OMP_NUM_THREADS": "1"}))
            for attempt, store in enumerate(stores) for rank in range(2)]
        for process in processes:
            assert process.finish() == 0, process.output()[-3000:]
    first, second = (set(store.list_keys()) for store in stores)
    assert first and second and not first & second


# Runs under torchrun as `fastimagenet train ...`, except that rank 1 kills itself at step 1 of epoch 1 (after epoch
# 0's checkpoint) on the first attempt, and on the restart starts only once rank 0 is forming the process group, as
# on a slow machine: rank 0 then reaches it first, where the failed attempt left rank 1's old address.
_DIES_ONCE_DRIVER = """
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})  # for tests.step_signals
from fastimagenet import loaders
from fastimagenet import train
from fastimagenet.cli import main
from tests.step_signals import signalling_build

rank_0_forming = Path({handshake!r})
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    if os.environ["RANK"] == "1":
        loaders.build_loader = signalling_build(loaders.build_loader, 1, 1, signal.SIGKILL, before_yield=True)
elif os.environ["RANK"] == "0":
    init = train.init_process_group
    def say_then_init(*args):
        rank_0_forming.touch()
        init(*args)
    train.init_process_group = say_then_init
else:
    deadline = time.monotonic() + 600
    while not rank_0_forming.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_restarts_a_crashed_rank_and_resume_auto_ends_as_an_uncrashed_run(tmp_path):
    """`torchrun --max-restarts=1 ... train --resume auto ...`: rank 1 dies (SIGKILL) in epoch 1, torchrun starts both
    ranks again with the same command line, they continue from epoch 0's checkpoint and end with the metrics and
    weights of a run that never crashed."""
    driver = tmp_path / "driver.py"
    driver.write_text(_DIES_ONCE_DRIVER.format(root=str(ROOT), handshake=str(tmp_path / "rank-0-forming")))

    def torchrun(out, *program):
        command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", *program,
                   "train", "--resume", "auto", "--loader", "synthetic", f"runtime.out_dir={tmp_path / out}", *TINY]
        # a process group that cannot form waits (for its 30-minute timeout): the guard ends torchrun and its workers
        result = run_to_end(command, tmp_path / f"{out}.log", env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]
        return result.stdout

    restarted = torchrun("restarted", "--max-restarts=1", str(driver))
    assert "(resuming at epoch 1)" in restarted and restarted.count("done: val top-1") == 1
    torchrun("uncrashed", "-m", "fastimagenet")
    a, b = read_metrics(tmp_path / "uncrashed"), read_metrics(tmp_path / "restarted")
    assert [r["epoch"] for r in b] == [0, 1]
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
    wa, wb = (torch.load(tmp_path / run / "last.pt", weights_only=False)["model"] for run in ("uncrashed", "restarted"))
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), rtol=1e-5, atol=1e-6), key


def test_static_graph_with_accumulation_is_a_clear_error():
    with pytest.raises(UserError, match="ddp_static_graph=true' cannot be combined"):
        load_config(None, ["runtime.ddp_static_graph=true", "optim.accum_steps=2"])


def test_sync_bn_on_cpu_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="sync_bn=true needs CUDA"):
        fit(load_config(None, [*TINY, "model.sync_bn=true", f"runtime.out_dir={tmp_path}"]))


@pytest.mark.parametrize("env, message", [({"RANK": "x"}, "RANK='x' is not an integer"),
                                          ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not within WORLD_SIZE=2")])
def test_bad_launcher_environment_is_a_clear_error(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=message):
        env_from_torchrun()
