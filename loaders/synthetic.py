"""synthetic backend: random uint8 images made once on the device, for model-only throughput (no decode cost)."""

from __future__ import annotations

from typing import Iterator

import torch

from fastimagenet.loaders.base import LoaderSpec, batches_per_epoch, check_batch_fits, epoch_order, host_to_device


class SyntheticLoader:
    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.classes = [f"class_{i}" for i in range(spec.num_classes or 1000)]
        self.skipped: dict[str, str] = {}
        self.samples = spec.options.synthetic_samples
        self.epoch, self.resolution, self.batch_size = 0, spec.resolution, spec.per_rank_batch()
        self.first_step = 0
        if spec.train:
            check_batch_fits(self.batch_size, self.samples // spec.world_size, "synthetic loader",
                             spec.batch_setting())

    def __len__(self) -> int:
        return batches_per_epoch(self.samples // self.spec.world_size, self.batch_size, self.spec.train)

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        self.epoch, self.first_step = epoch, first_step

    def reconfigure(self, resolution: int, batch_size: int) -> None:
        self.resolution, self.batch_size = resolution, self.spec.per_rank_batch(batch_size)
        if self.spec.train:
            check_batch_fits(self.batch_size, self.samples // self.spec.world_size, "synthetic loader",
                             self.spec.batch_setting())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.spec.seed * 10_007 + self.epoch + 7919 * self.spec.rank)
        shape = (self.batch_size, self.resolution, self.resolution, 3)
        # One batch made once per epoch and re-used: the point is to measure the model, not the generator.
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        # once an epoch, and without blocking the host (the sync-free step test crosses epochs)
        images = host_to_device(images, self.spec.device).permute(0, 3, 1, 2)
        labels = epoch_order(len(self) * self.batch_size, self.spec.seed, self.epoch, True) % len(self.classes)
        labels = host_to_device(labels, self.spec.device)
        per_rank = self.samples // self.spec.world_size
        for step in range(self.first_step, len(self)):
            batch = min(self.batch_size, per_rank - step * self.batch_size)
            yield images[:batch], labels[step * self.batch_size : step * self.batch_size + batch]
