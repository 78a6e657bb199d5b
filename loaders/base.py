"""The Loader protocol every backend implements, and the spec a backend is built from."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

from fastimagenet.common.errors import UserError
from fastimagenet.loaders.augment import Augmentation
from fastimagenet.loaders.options import LoaderConfig


class Loader(Protocol):
    """Yields (images, labels) on the training device.

    images: uint8, NCHW shape in channels-last memory (the loop normalises on the device); labels: int64.
    """

    classes: list[str]  # class names, index = label
    skipped: dict[str, str]  # unreadable files met so far -> reason (never silently dropped)

    def __len__(self) -> int:  # batches this epoch, at the current batch size
        ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """The next pass is `epoch`: a shuffle that is a function of (seed, epoch), the same on every rank. With
        `first_step` > 0 it resumes that epoch: it yields batches first_step..len-1 of it, the same samples as an
        uninterrupted pass (`len` stays the whole epoch's count)."""

    def reconfigure(self, resolution: int, batch_size: int) -> None:  # takes effect from the next epoch
        ...


@dataclass
class LoaderSpec:
    path: str  # what the backend reads (a folder or a file); "" for synthetic
    train: bool  # train: random-resized-crop + flip, shuffled, last partial batch dropped; eval: centre crop, every sample
    resolution: int
    batch_size: int  # global batch; each rank gets batch_size // world_size
    device: torch.device
    augment: Augmentation  # scale, ratio, flip, crop_ratio: the augmentation (loaders/augment.py)
    options: LoaderConfig
    seed: int = 0
    strict: bool = False
    classes: list[str] | None = None  # eval loaders take the train split's classes so labels agree
    num_classes: int = 0  # for loaders with no class names on disk (synthetic)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank within this node: local rank 0 does the node's one-off work (image verification)
    # Where `path` and `batch_size` were set, named in messages: "" means the training config's keys (data.train or
    # data.val; optim.batch_size or a stage's batch); `bench loader` passes its own flags (--data, --batch-size).
    path_key: str = ""
    batch_key: str = ""

    def path_setting(self) -> str:
        return self.path_key or ("data.train" if self.train else "data.val")

    def batch_setting(self) -> str:
        return self.batch_key or "optim.batch_size or the stage's batch"

    def per_rank_batch(self, batch_size: int | None = None) -> int:
        batch_size = self.batch_size if batch_size is None else batch_size
        if batch_size % self.world_size:
            raise UserError(f"batch size {batch_size} is not divisible by the {self.world_size} processes")
        return batch_size // self.world_size

    def workers(self) -> int:
        """Worker processes or decode threads: `loader.workers` when set, else this process's share of the CPUs.
        The val loader gets half of it: it runs only between training epochs, while the train loader's persistent
        workers wait, and its idle workers would otherwise hold memory for nothing."""
        if self.options.workers:
            return self.options.workers
        share = cpus_per_process()
        return share if self.train else max(1, share // 2)


def cpus_per_process() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and Slurm narrow), divided among the
    processes of this node: under torchrun every GPU's process builds its own loaders, so a per-process default of
    every core would start LOCAL_WORLD_SIZE times too many workers."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, available // local_world_size())


def local_world_size() -> int:
    """Processes of this node (torchrun's LOCAL_WORLD_SIZE): they share its CPUs and its /dev/shm."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_batch_fits(batch_size: int, samples: int, what: str,
                     setting: str = "optim.batch_size or the stage's batch") -> None:
    """A training loader drops the last partial batch, so a batch larger than the data would train on nothing.
    `setting`: what the user lowers (LoaderSpec.batch_setting())."""
    if batch_size > samples:
        raise UserError(f"{what}: batch size {batch_size} is larger than the {samples} samples per process "
                        f"(lower {setting})")


def rank_share(order: torch.Tensor, spec: LoaderSpec) -> torch.Tensor:
    """This rank's part of an epoch's order: every world_size-th index from rank r, so shards are disjoint. Training
    first drops the tail that does not divide evenly, so every rank runs the same number of steps."""
    if spec.train:
        order = order[: len(order) - len(order) % spec.world_size]
    return order[spec.rank :: spec.world_size]


def batches_per_epoch(samples: int, batch_size: int, train: bool) -> int:
    """Training drops the last partial batch; evaluation keeps it, so every sample is seen."""
    return samples // batch_size if train else math.ceil(samples / batch_size)


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The same permutation on every rank: seeded by (seed, epoch) only."""
    if not shuffle:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed * 10_007 + epoch)
    return torch.randperm(count, generator=generator)


def to_device_nchw(images_nhwc: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """NHWC uint8 batch -> NCHW view in channels-last memory on the device (no copy of the layout). Each tensor is
    copied without blocking the host only when it is pinned: a pageable host->GPU copy is a host sync, so backends
    pin what they hand over, or put it on the device themselves (then `.to` is a no-op)."""
    images = images_nhwc.to(device, non_blocking=images_nhwc.is_pinned()).permute(0, 3, 1, 2)
    return images, labels.to(device, non_blocking=labels.is_pinned())


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor made on the host, on the device without blocking the host: pinned first when the device is a GPU
    (a pageable host->GPU copy is a host sync; torch's pinned allocator keeps the block until the copy has run)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=tensor.is_pinned())


def copied_ahead(host_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Host batches (pinned uint8 NHWC images, labels) on the device, as `to_device_nchw` gives them. On a GPU the
    copy of each batch runs on a side stream, issued before the batch ahead of it is handed out, so it overlaps that
    batch's training step instead of queueing in front of the next one on the compute stream. The compute stream
    waits for a copy (on the device: the host never waits) before its batch is handed out, and the tensors are
    marked as used there, so the allocator does not give their memory to the side stream while the step reads it.
    One batch more lives on the device."""
    if device.type != "cuda":
        for images, labels in host_batches:
            yield to_device_nchw(images, labels, device)
        return
    side, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    ready = None
    for images, labels in host_batches:
        with torch.cuda.stream(side):
            copied = to_device_nchw(images, labels, device)  # runs during the step on `ready`
        if ready is not None:
            yield ready
        compute.wait_stream(side)  # after that step, before the next: this copy only
        for tensor in copied:
            tensor.record_stream(compute)
        ready = copied
    if ready is not None:
        yield ready
