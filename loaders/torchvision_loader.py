"""torchvision backend: a torch DataLoader with persistent workers over an ImageFolder tree or a sharded split
(local or s3://: loaders/shard_source.py gives its samples, order and fetching).

Speed comes from what the plain ImageFolder pipeline does not do:
- JPEGs are decoded in the DCT domain at 1/2, 1/4 or 1/8 scale whenever the crop allows, straight into the crop at
  the output size (loaders/image_decode.py), and flips happen after the resize;
- a worker decodes a whole batch at once, each image straight into its slot of one shared-memory batch: no tensor per
  sample, no collation, nothing copied on the way to the main process;
- batches stay uint8 NHWC to the device, where the loop normalises them; on a GPU each is copied there on a side
  stream while the step before it runs (loaders/base.py: copied_ahead).

The (resolution, batch size) of an epoch travel inside the sampler's requests, so `reconfigure` reaches persistent
workers without re-spawning them.
"""

from __future__ import annotations

import math
import shutil
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools.scan import scan_image_folder
from fastimagenet.dataset_tools.verify import kept_samples
from fastimagenet.loaders.augment import Augmentation, TrainCrops, center_crop_box
from fastimagenet.loaders.base import (LoaderSpec, batches_per_epoch, check_batch_fits, copied_ahead, epoch_order,
                                       local_world_size, rank_share)
from fastimagenet.loaders.image_decode import decode_crop, forking_workers, single_threaded_worker
from fastimagenet.loaders.shard_source import ShardSource, is_shard_dataset

# How many following samples to try in place of an unreadable one, so an epoch never dies on one bad file.
_SUBSTITUTE_TRIES = 16
_PREFETCH = 4  # batches each worker prepares ahead


class _FolderDataset(Dataset):
    """Decodes a batch of requests (index, resolution, epoch) into one batch; never raises on a bad file."""

    def __init__(self, samples: list[tuple[str, int]], sizes: np.ndarray, augment: Augmentation, train: bool,
                 seed: int):
        self.samples, self.sizes, self.augment, self.train, self.seed = samples, sizes, augment, train, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, requests: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """torch's fetcher hands over a batch sampler's whole batch, so its crops are drawn together and each image
        is decoded straight into its slot of the batch: (images NHWC uint8, labels int64, unreadable files)."""
        indices = [index for index, _, _ in requests]
        _, resolution, epoch = requests[0]  # one batch, one epoch and resolution
        crops = TrainCrops(indices, self.sizes, self.seed, epoch, self.augment) if self.train else None
        images = _batch_buffer((len(indices), resolution, resolution, 3), shared=get_worker_info() is not None)
        slots, labels, failures = images.numpy(), [], []
        for k, index in enumerate(indices):
            labels.append(self._decode_into(slots[k], index, resolution, epoch, crops, k, failures))
        return images, torch.tensor(labels, dtype=torch.int64), failures

    def _decode(self, index: int, resolution: int, crops: TrainCrops | None, k: int, out: np.ndarray) -> None:
        path = self.samples[index][0]
        if crops is None:
            decode_crop(path, lambda w, h: center_crop_box(w, h, self.augment.crop_ratio), resolution, False, out)
        else:
            decode_crop(path, crops.box_of(k), resolution, crops.flips[k], out)

    def _decode_into(self, out: np.ndarray, index: int, resolution: int, epoch: int, crops: TrainCrops | None,
                     k: int, failures: list) -> int:
        """Sample `index` (or, unreadable, a following one) decoded into `out`; its label. Unreadable files are
        appended to `failures`."""
        first_failure = len(failures)
        for offset in range(_SUBSTITUTE_TRIES):
            candidate = (index + offset) % len(self.samples)
            if offset and crops is not None:  # a substitute gets its own crop
                crops, k = TrainCrops([candidate], self.sizes, self.seed, epoch, self.augment), 0
            try:
                self._decode(candidate, resolution, crops, k, out)
                return self.samples[candidate][1]
            except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable file"
                failures.append((str(self.samples[candidate][0]), f"{type(exc).__name__}: {exc}"))
        path, reason = failures[first_failure]
        raise UserError(f"{_SUBSTITUTE_TRIES} consecutive unreadable images, e.g. {path}: {reason}")


def _batch_buffer(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An uninitialised uint8 batch; in shared memory when it will cross to the main process. Made there at once, as
    torch's own collate makes its batches (share_memory_() of a tensor would allocate it twice and copy it over: a
    third of a batch's shared-memory cost, which is mostly the kernel zeroing its fresh pages)."""
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _as_batch(batch):
    """The dataset already made the batch (_FolderDataset.__getitems__): nothing to collate."""
    return batch


def shm_bytes_needed(workers: int, batch: int, resolution: int, processes: int = 1) -> int:
    """Shared memory (/dev/shm) the batches of `processes` such loaders on one node hold at once: each DataLoader
    keeps workers x prefetch batches in flight, plus the one its loop is using; a batch is batch x resolution^2 x 3
    uint8 pixels and batch int64 labels (the queue moves those to shared memory too). Without workers nothing is
    shared."""
    if workers == 0:
        return 0
    return processes * (workers * _PREFETCH + 1) * _batch_bytes(batch, resolution)


def _batch_bytes(batch: int, resolution: int) -> int:
    return batch * (resolution * resolution * 3 + 8)


def _shm_space() -> tuple[int, int] | None:
    """(total, free) bytes of /dev/shm; None where there is none (not Linux)."""
    try:
        usage = shutil.disk_usage("/dev/shm")
    except OSError:
        return None
    return usage.total, usage.free


def check_shared_memory(workers: int, batch: int, resolution: int) -> None:
    """Stop with the fixes before the workers start, instead of a bus error in a worker (or a hang) once /dev/shm
    is full, which is what a container's default 64 MB gives at ImageNet batch sizes."""
    processes = local_world_size()  # every rank of this node runs its own loaders
    need, space = shm_bytes_needed(workers, batch, resolution, processes), _shm_space()
    if space is None or need <= space[1]:
        return
    total, free = space
    fitting = (free // (processes * _batch_bytes(batch, resolution)) - 1) // _PREFETCH  # the most workers that fit
    fewer = f"fewer workers (loader.workers={fitting})" if fitting >= 1 else "fewer workers"
    raise UserError(
        f"torchvision loader: {workers} workers x {_PREFETCH} prefetched batches (+1 in use) of {batch} images at "
        f"{resolution} px, in each of {processes} process(es) on this node, need {need / 2**20:,.1f} MiB of shared "
        f"memory (/dev/shm) but {free / 2**20:,.1f} MiB are free. Fixes: a larger /dev/shm (`docker run "
        f"--shm-size={math.ceil((total - free + need) / 2**30)}g ...`, or --ipc=host), {fewer}, or a smaller "
        "batch (optim.batch_size, the schedule's stages)")


class _EpochBatchSampler:
    """Runs in the main process: each epoch it yields batches of requests carrying the current resolution."""

    def __init__(self, count: int, spec: LoaderSpec, shards: ShardSource | None = None):
        self.count, self.spec, self.shards = count, spec, shards
        self.epoch, self.resolution, self.batch_size = 0, spec.resolution, spec.per_rank_batch()
        self.first_step = 0

    def _indices(self) -> list[int]:
        if self.shards is not None:  # a sharded split has an order of its own (loaders/shard_source.py)
            return self.shards.order(self.epoch).tolist()
        return rank_share(epoch_order(self.count, self.spec.seed, self.epoch, self.spec.train), self.spec).tolist()

    def __iter__(self):
        indices = self._indices()
        batches = (indices[start : start + self.batch_size]
                   for start in range(self.first_step * self.batch_size, len(self) * self.batch_size, self.batch_size))
        if self.shards is not None:  # each batch once its shards are local
            batches = self.shards.fetched(batches)
        for batch in batches:
            yield [(i, self.resolution, self.epoch) for i in batch]

    def __len__(self) -> int:
        return batches_per_epoch(len(self._indices()), self.batch_size, self.spec.train)


class TorchvisionLoader:
    def __init__(self, spec: LoaderSpec):
        shards = ShardSource(spec) if is_shard_dataset(spec.path) else None
        if shards is not None:  # shards hold only images convert kept
            samples, self.skipped, sizes, self.classes = shards.samples, shards.skipped, shards.sizes, shards.classes
        else:
            scan = scan_image_folder(spec.path, spec.classes)
            # The files every backend keeps (verified once per node and cached, as for DALI); what is left out is
            # reported now. A file that fails later anyway (changed since) is replaced by a neighbour and reported.
            samples, self.skipped, sizes = kept_samples(scan, spec.path, spec.strict, spec.local_rank)
            self.classes = scan.classes
        self.spec = spec
        self._sampler = _EpochBatchSampler(len(samples), spec, shards)
        if spec.train:
            check_batch_fits(self._sampler.batch_size, len(samples) // spec.world_size, spec.path,
                             spec.batch_setting())
        workers = self._workers = spec.workers()
        check_shared_memory(workers, self._sampler.batch_size, spec.resolution)
        self._loader = DataLoader(
            _FolderDataset(samples, np.array(sizes, dtype=np.int32), spec.augment, spec.train, spec.seed),
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=_as_batch,
            worker_init_fn=single_threaded_worker,
            pin_memory=spec.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=_PREFETCH if workers > 0 else None,
        )

    def __len__(self) -> int:
        return len(self._sampler)

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        self._sampler.epoch, self._sampler.first_step = epoch, first_step

    def reconfigure(self, resolution: int, batch_size: int) -> None:
        per_rank = self.spec.per_rank_batch(batch_size)
        if self.spec.train:
            check_batch_fits(per_rank, self._sampler.count // self.spec.world_size, self.spec.path,
                             self.spec.batch_setting())
        if _batch_bytes(per_rank, resolution) > _batch_bytes(self._sampler.batch_size, self._sampler.resolution):
            check_shared_memory(self._workers, per_rank, resolution)
        self._sampler.resolution, self._sampler.batch_size = resolution, per_rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return copied_ahead(self._host_batches(), self.spec.device)

    def _host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The DataLoader's batches, their unreadable files recorded (or, strict, an error)."""
        new = {}
        with forking_workers():  # the first pass starts the (persistent) workers
            batches = iter(self._loader)
        for images, labels, failures in batches:
            for path, reason in failures:
                if self.spec.strict:
                    raise UserError(f"{path}: unreadable image ({reason}); set data.strict=false to skip such files")
                if path not in self.skipped:
                    new[path] = self.skipped[path] = reason
            yield images, labels
        if new:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in list(new.items())[:10])
            print(f"warning: {len(new)} unreadable images replaced by their neighbours "
                  f"({len(self.skipped)} in all):\n{listing}")


def raw_pipeline(spec: LoaderSpec) -> DataLoader:
    """The plain pipeline users start from, the benchmark's baseline: ImageFolder with PIL decoding whole images,
    then (training) RandomResizedCrop + flip or (eval) resize + centre crop, PILToTensor, in a DataLoader."""
    from torchvision import datasets, transforms

    aug = spec.augment
    if spec.train:
        crop = [transforms.RandomResizedCrop(spec.resolution, scale=tuple(aug.scale), ratio=tuple(aug.ratio))]
        crop += [transforms.RandomHorizontalFlip()] if aug.flip else []
    else:
        crop = [transforms.Resize(round(spec.resolution / aug.crop_ratio)), transforms.CenterCrop(spec.resolution)]
    dataset = datasets.ImageFolder(spec.path, transform=transforms.Compose([*crop, transforms.PILToTensor()]))
    workers = spec.workers()
    return DataLoader(dataset, batch_size=spec.per_rank_batch(), shuffle=spec.train, drop_last=spec.train,
                      num_workers=workers, persistent_workers=workers > 0)
