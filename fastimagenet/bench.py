"""`fastimagenet bench loader`: images/s of a loader backend on its own (no model), with same-run baselines.
`fastimagenet bench train`: images/s of the whole training step fed by a loader, against the same step fed by the
synthetic loader in the same run (the loader's efficiency, end to end)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import tempfile
import time
from typing import Iterator

import torch

from fastimagenet import loaders
from fastimagenet.common.errors import UserError
from fastimagenet.config import Config, DataConfig
from fastimagenet.loaders.base import LoaderSpec
from fastimagenet.loaders.options import LoaderConfig


def _one_pass(iterable) -> float:
    images, batch = 0, None
    start = time.perf_counter()
    for batch, labels in iterable:
        images += labels.shape[0]
    if batch is not None and batch.is_cuda:
        torch.cuda.synchronize()  # sync: the pass ends when the device has the last batch
    return images / (time.perf_counter() - start)


def compare_throughput(pipelines: dict, rounds: int, one_pass=_one_pass) -> tuple[dict[str, float], dict[str, list]]:
    """Median images/s of each pipeline over `rounds` timed passes, and every pass's images/s (`one_pass(pipeline)`
    runs one and returns its images/s; by default a whole epoch of an iterable), after one untimed pass each (worker
    start-up, JIT compiles, cold page cache). The pipelines take turns in a rotating order, so a change of load on
    the machine during the run hits every one of them alike."""
    for pipeline in pipelines.values():
        one_pass(pipeline)
    names = list(pipelines)
    figures = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            figures[name].append(one_pass(pipelines[name]))
    return {name: statistics.median(values) for name, values in figures.items()}, figures


class _Epochs:
    """A loader iterated as `train` iterates it: each pass is its next epoch (set_epoch). The baselines, too, read a
    new order each pass, and a backend may start reading its next epoch when one ends (DALI's own reader does)."""

    def __init__(self, loader):
        self.loader, self._epochs = loader, itertools.count()

    def __iter__(self):
        self.loader.set_epoch(next(self._epochs))
        return iter(self.loader)


def torchvision_reference(data: str, resolution: int, batch_size: int, workers: int):
    """The plain pipeline users start from: ImageFolder + RandomResizedCrop + flip + PILToTensor in a DataLoader."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(resolution),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])
    dataset = datasets.ImageFolder(data, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0)


def image_folder_of(data: str) -> str:
    """The ImageFolder behind a benchmark's data: the folder itself, or the one a .beton was converted from."""
    if not data:
        raise UserError("bench loader: --baseline torchvision reads an ImageFolder: give it with --data DIR")
    if not data.endswith(".beton"):
        return data
    from fastimagenet.dataset_tools.convert import read_sidecar

    source = read_sidecar(data).get("source")
    if source is None:  # written from arrays (the demo's Fashion-MNIST), not by `convert`
        raise UserError(f"{data} was not converted from an image folder: give the folder with --data")
    return source


def bench_loader(name: str, data: str, resolution: int, batch_size: int, workers: int, device: str,
                 baselines: list[str], rounds: int = 3, options: LoaderConfig | None = None) -> dict:
    options = options or LoaderConfig(name=name, workers=workers)
    workers = workers or os.cpu_count() or 1
    spec = LoaderSpec(path=data, train=True, resolution=resolution, batch_size=batch_size,
                      device=torch.device(device), augment=DataConfig(), options=options, path_key="--data",
                      batch_key="--batch-size")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as scratch:
        pipelines = {"images_per_s": _Epochs(loaders.build_loader(name, spec))}
        for baseline in baselines:
            if baseline == "torchvision":
                pipeline = torchvision_reference(image_folder_of(data), resolution, batch_size, workers)
            elif baseline == "raw":
                pipeline = loaders.build_raw_pipeline(name, spec)
            else:  # another backend's library used by hand, on the same images
                pipeline = loaders.build_reference(baseline, spec, scratch)
            pipelines[f"{baseline}_images_per_s"] = pipeline
        figures, passes = compare_throughput(pipelines, rounds)
    result = {"loader": name, "resolution": resolution, "batch_size": batch_size, "workers": workers,
              "device": device, "rounds": rounds, **figures}
    for baseline in baselines:
        result[f"ratio_vs_{baseline}"] = figures["images_per_s"] / figures[f"{baseline}_images_per_s"]
        # the ratio within each round, where the pipelines ran back to back: how much of the median is load noise
        result[f"round_ratios_vs_{baseline}"] = [ours / theirs for ours, theirs in
                                                 zip(passes["images_per_s"], passes[f"{baseline}_images_per_s"])]
    return result


def print_result(result: dict) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


class _TrainFeed:
    """A Training fed by its own loader, for `bench train`. Each pass starts a new epoch of the loader, as every
    epoch of `train` does (wrapping to the next epoch when this one has fewer batches than the pass needs), and
    closes it when the pass ends: an idle loader's prefetched batches would otherwise flatter its next pass. The
    first step of a pass waits for the epoch's start-up (workers, a new pipeline) and is left out of the timing,
    as `train` leaves out its first steps."""

    def __init__(self, run, steps: int):
        self.run, self.steps = run, steps
        self.row = run.plan.rows[0]
        self._epochs = itertools.count()  # carried across passes, so every pass reads a new epoch's order

    def reconfigure(self, row) -> None:
        """The plan row's shape, from the next pass on; the LR is the one its epoch starts with."""
        from fastimagenet.optim import set_lr

        self.row = row
        self.run.train_loader.reconfigure(row.resolution, row.micro_batch)
        set_lr(self.run.optimizer, row.lr_start)

    def _batches(self):
        loader = self.run.train_loader
        for epoch in self._epochs:
            loader.set_epoch(epoch)
            if len(loader) == 0:  # the backends refuse a batch larger than the data; never loop on nothing
                raise UserError("bench train: the train split gives no batch at this batch size")
            yield from loader  # closing this generator closes the loader's epoch iterator too

    def timed_pass(self) -> float:
        from fastimagenet.train import train_step

        run, accum = self.run, self.row.accum_steps
        run.train_module.train()
        batches = self._batches()
        try:
            images, labels = next(batches)
            train_step(run, images, labels, accum, update=accum == 1)
            run.rt.synchronize()  # sync: the timed pass starts once the untimed first step is done
            count, start = 0, time.perf_counter()
            for step in range(1, self.steps + 1):
                images, labels = next(batches)
                train_step(run, images, labels, accum, update=(step + 1) % accum == 0)
                count += labels.shape[0]
            run.rt.synchronize()  # sync: the pass ends when the device has finished its last step
            return count / (time.perf_counter() - start)
        finally:
            batches.close()


def bench_train(cfg: Config, steps: int = 50, rounds: int = 3) -> Iterator[dict]:
    """Per distinct (resolution, micro-batch) of the recipe's plan, in plan order: images/s of `train`'s own step
    (forward, backward, optimizer) fed by cfg's loader, and fed by the synthetic loader in the same run, with their
    ratio. Both are built as `train` builds its run, so the model, compile, precision and optimizer are the same.
    Yields one result per shape, as it is measured."""
    from fastimagenet.plan import build_plan
    from fastimagenet.runtime import resolve_runtime, seed_everything
    from fastimagenet.training_setup import build_training

    if steps < 1:
        raise UserError(f"bench train: --steps must be at least 1, got {steps}")
    if rounds < 1:
        raise UserError(f"bench train: --rounds must be at least 1, got {rounds}")
    rt = resolve_runtime(cfg)
    plan = build_plan(cfg)
    first_rows = [row for row in plan.rows if row.new_shape]  # each distinct (resolution, micro-batch), in order
    seed_everything(cfg.runtime.seed)
    real = build_training(cfg, plan, rt, with_val=False)
    # The synthetic twin: the same model and classes; one epoch holds a whole pass at the largest batch.
    samples = (steps + 1) * max(row.micro_batch for row in first_rows)
    synthetic_cfg = dataclasses.replace(
        cfg, loader=dataclasses.replace(cfg.loader, name="synthetic",
                                        synthetic_samples=max(cfg.loader.synthetic_samples, samples)),
        data=dataclasses.replace(cfg.data, num_classes=cfg.data.num_classes or len(real.train_loader.classes)))
    seed_everything(cfg.runtime.seed)
    synthetic = build_training(synthetic_cfg, plan, rt, with_val=False)
    feeds = {"images_per_s": _TrainFeed(real, steps), "synthetic_images_per_s": _TrainFeed(synthetic, steps)}
    for row in first_rows:
        for feed in feeds.values():
            feed.reconfigure(row)
        # compare_throughput's untimed first pass of each is the warm-up: a new shape compiles there
        figures, _ = compare_throughput(feeds, rounds, one_pass=_TrainFeed.timed_pass)
        yield {"loader": cfg.loader.name, "resolution": row.resolution, "batch_size": row.micro_batch,
               "accum_steps": row.accum_steps, "first_epoch": row.epoch, "model": cfg.model.arch,
               "device": str(rt.device), "precision": rt.precision, "compile": rt.compile, "steps": steps,
               "rounds": rounds, **figures,
               "loader_efficiency": figures["images_per_s"] / figures["synthetic_images_per_s"]}


def train_table(results: list[dict]) -> str:
    """`bench train`'s results, readable: one line per shape."""
    lines = [f"{'resolution (px)':>15} {'batch (images)':>14} {'loader (images/s)':>17} "
             f"{'synthetic (images/s)':>20} {'efficiency (loader/synthetic)':>29}"]
    for r in results:
        lines.append(f"{r['resolution']:>15} {r['batch_size']:>14} {r['images_per_s']:>17.1f} "
                     f"{r['synthetic_images_per_s']:>20.1f} {r['loader_efficiency']:>29.3f}")
    return "\n".join(lines)
