"""Default loader workers are this process's share of the CPUs: its affinity mask divided by the processes of the
node (LOCAL_WORLD_SIZE), half of it for val; `loader.workers` overrides it. The backends start that many."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastimagenet import loaders
from fastimagenet.loaders.base import cpus_per_process
from tests.conftest import make_spec


@pytest.fixture
def sixteen_cpus(monkeypatch):
    """A process allowed on 16 CPUs, alone on its node unless a test sets LOCAL_WORLD_SIZE."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_a_narrowed_affinity_mask_narrows_the_share():
    """A real mask, as taskset, a container's cpuset or Slurm set it: one allowed CPU is one worker."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from fastimagenet.loaders.base import cpus_per_process; print(cpus_per_process())")
    env = {key: value for key, value in os.environ.items() if key != "LOCAL_WORLD_SIZE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1"


def test_the_cpus_are_divided_among_the_processes_of_the_node(sixteen_cpus, monkeypatch):
    assert cpus_per_process() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cpus_per_process() == 2
    train, val = make_spec("", workers=0), make_spec("", train=False, workers=0)
    assert (train.workers(), val.workers()) == (2, 1)


def test_more_processes_than_cpus_still_get_one_worker(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 GPU processes on this (small) machine
    assert cpus_per_process() == 1
    assert make_spec("", workers=0).workers() == make_spec("", train=False, workers=0).workers() == 1


def test_val_gets_half_and_loader_workers_overrides_both(sixteen_cpus, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert (make_spec("", workers=0).workers(), make_spec("", train=False, workers=0).workers()) == (8, 4)
    assert (make_spec("", workers=3).workers(), make_spec("", train=False, workers=3).workers()) == (3, 3)


def test_torchvision_starts_the_budgeted_worker_processes(jpeg_dataset, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 4 CPUs / 2 processes: 2 train workers, 1 val worker
    for split, train, expected in (("train", True, 2), ("val", False, 1)):
        loader = loaders.build_loader("torchvision", make_spec(jpeg_dataset / split, train=train, workers=0,
                                                               batch_size=8))
        next(iter(loader))
        workers = loader._loader._iterator._workers
        assert len({w.pid for w in workers}) == expected and all(w.is_alive() for w in workers)
