"""`fastimagenet bench loader`: images/s of a loader backend on its own (no model), with same-run baselines.
`fastimagenet bench train`: images/s of the whole training step fed by a loader, against the same step fed by the
synthetic loader in the same run (the loader's efficiency, end to end)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import statistics
import tempfile
import time
import traceback
from typing import Iterator, NamedTuple

import torch

from fastimagenet import loaders
from fastimagenet.common.errors import UserError
from fastimagenet.config import Config, DataConfig
from fastimagenet.dataset_tools.shards import is_shard_dataset
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


class _WholeDecodes(torch.utils.data.Dataset):
    """The images of a folder decoded whole with PIL, nothing else: no crop, no resize, no pixels handed over (only
    the labels). What decoding the files costs: the floor under any pipeline that decodes them whole."""

    def __init__(self, folder: str):
        from torchvision import datasets

        self.samples = datasets.ImageFolder(folder).samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        for index in indices:
            with Image.open(self.samples[index][0]) as img:
                img.convert("RGB")
        labels = torch.tensor([self.samples[index][1] for index in indices])
        return labels, labels  # (images, labels) as a pipeline yields them: the labels stand in for the images


def _as_batch(batch):
    return batch


def whole_decode_pipeline(spec: LoaderSpec) -> torch.utils.data.DataLoader:
    """`_WholeDecodes` of the folder spec.path in a DataLoader with the spec's workers."""
    workers = spec.workers()
    return torch.utils.data.DataLoader(_WholeDecodes(spec.path), batch_size=spec.per_rank_batch(), shuffle=True,
                                       drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                       collate_fn=_as_batch)


class Pipeline(NamedTuple):
    """One pipeline a benchmark compares, as data (it travels to the process that builds it). kind "loader": the
    backend as `train` uses it; "raw": the backend's library used by hand (its `raw_pipeline`); "decode": the whole
    decode of the images (whole_decode_pipeline)."""

    kind: str
    backend: str
    spec: LoaderSpec

    def build(self):
        if self.kind == "loader":
            return _Epochs(loaders.build_loader(self.backend, self.spec))
        if self.kind == "raw":
            return loaders.build_raw_pipeline(self.backend, self.spec)
        return whole_decode_pipeline(self.spec)


class _InThisProcess:
    """A pipeline built and timed in the benchmark's own process."""

    def __init__(self):
        self._pipeline = None

    def build(self, pipeline: Pipeline) -> None:
        self._pipeline = None  # the previous one's workers end before the next one's start
        self._pipeline = pipeline.build()

    def one_pass(self) -> float:
        return _one_pass(self._pipeline)

    def close(self) -> None:
        self._pipeline = None


def _serve(connection) -> None:
    """A pipeline's own process: builds what it is sent, times a pass when asked, until told to stop."""
    here = _InThisProcess()
    while True:
        command, argument = connection.recv()
        if command == "stop":
            return
        try:
            connection.send(("ok", here.build(argument) if command == "build" else here.one_pass()))
        except UserError as exc:
            connection.send(("user error", str(exc)))
        except BaseException:
            connection.send(("failed", traceback.format_exc()))
            raise


class _InOwnProcess:
    """A pipeline built and timed in a process of its own, started once and reused for each pipeline it is sent, so
    that one pipeline's threads, workers and memory stay out of another's process. Spawned, not forked: the child
    starts from a clean interpreter, not from a copy of this one's threads."""

    def __init__(self):
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), name="bench-pipeline")
        self._process.start()
        child.close()

    def _ask(self, command: str, argument=None):
        self._connection.send((command, argument))
        try:
            status, value = self._connection.recv()
        except EOFError:
            raise RuntimeError(f"bench: a pipeline's process ended (exit code {self._process.exitcode})") from None
        if status == "user error":
            raise UserError(value)
        if status == "failed":
            raise RuntimeError(f"bench: a pipeline failed in its process:\n{value}")
        return value

    def build(self, pipeline: Pipeline) -> None:
        self._ask("build", pipeline)

    def one_pass(self) -> float:
        return self._ask("pass")

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._connection.send(("stop", None))
            except OSError:  # the child has gone already
                pass
            self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._connection.close()


def _pipelines(names: list[str], data: str, baselines: list[str], spec: LoaderSpec,
               scratch: str) -> dict[tuple[str, str], Pipeline]:
    """The pipelines of a sweep, keyed (kind, backend), each once: every backend in `names` as `train` uses it, on
    the images of `data` in the form that backend reads (loaders.data_for; a sharded split as it is, for the backends
    that read shards), and the baselines: "raw" is each backend's own library on the images in its form; a backend's
    name is that backend's library on the same images in its own form (converted into `scratch` when needed);
    "decode" is the whole decode of the images; "folder" is each backend as `train` uses it on the image folder a
    sharded split was written from."""
    sharded = bool(str(data).strip()) and is_shard_dataset(data)
    images = str(loaders.image_folder_of(data)) if sharded else data  # what the libraries used by hand read

    def reading(name: str, shards_as_they_are: bool = False) -> LoaderSpec:
        if not (loaders.reads(name) and str(data).strip()):  # "": build_loader says what is missing
            return dataclasses.replace(spec, path="")
        if sharded and shards_as_they_are and loaders.reads_folders(name):
            return dataclasses.replace(spec, path=data)
        return dataclasses.replace(spec, path=loaders.data_for(name, images, scratch, spec.workers()))

    reading_images = [baseline for baseline in baselines if baseline != "raw"]
    if not str(data).strip() and reading_images:
        raise UserError(f"bench loader: --baseline {reading_images[0]} reads an ImageFolder: give it with --data DIR "
                        "(or a .beton or sharded split written from one)")
    if "folder" in baselines and not sharded:
        raise UserError("bench loader: --baseline folder compares a sharded split (--data) with the image folder it "
                        "was written from")
    pipelines = {("loader", name): Pipeline("loader", name, reading(name, shards_as_they_are=True)) for name in names}
    for baseline in baselines:
        if baseline in ("raw", "folder"):
            for name in names:
                kind = "raw" if baseline == "raw" else "loader"
                pipelines.setdefault((baseline, name), Pipeline(kind, name, reading(name)))
        elif baseline == "decode":
            folder = str(loaders.image_folder_of(images))
            pipelines.setdefault(("decode", ""), Pipeline("decode", "", dataclasses.replace(spec, path=folder)))
        else:
            pipelines.setdefault(("raw", baseline), Pipeline("raw", baseline, reading(baseline)))
    return pipelines


def _baseline_key(baseline: str, name: str) -> tuple[str, str]:
    """The pipeline (kind, backend) that `baseline` names for backend `name` (see _pipelines)."""
    return {"raw": ("raw", name), "folder": ("folder", name), "decode": ("decode", "")}.get(baseline,
                                                                                           ("raw", baseline))


def bench_loaders(names: list[str], data: str, resolutions: list[int], batch_size: int, workers: int, device: str,
                  baselines: list[str], rounds: int = 3, options: LoaderConfig | None = None,
                  own_processes: bool = False) -> Iterator[dict]:
    """Images/s of each backend in `names` and of each baseline (see _pipelines), one resolution after the other:
    at each, every pipeline is built, takes one untimed pass, then `rounds` timed passes in turns with the others
    (compare_throughput). Yields one result per (backend, resolution) with each baseline's figures and the ratios.
    own_processes: each pipeline runs in a process of its own (the command line's way)."""
    if rounds < 1:
        raise UserError(f"bench loader: --rounds must be at least 1, got {rounds}")
    if not resolutions or min(resolutions) < 1:
        raise UserError(f"bench loader: resolutions must be positive pixel counts, got {resolutions}")
    options = options or LoaderConfig(name=names[0], workers=workers)
    spec = LoaderSpec(path="", train=True, resolution=resolutions[0], batch_size=batch_size,
                      device=torch.device(device), augment=DataConfig(), options=options, path_key="--data",
                      batch_key="--batch-size")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as scratch:
        pipelines = _pipelines(names, data, baselines, spec, scratch)
        runners = {}
        try:
            for key in pipelines:
                runners[key] = _InOwnProcess() if own_processes else _InThisProcess()
            for resolution in resolutions:
                for key, pipeline in pipelines.items():
                    runners[key].build(pipeline._replace(spec=dataclasses.replace(pipeline.spec,
                                                                                  resolution=resolution)))
                figures, passes = compare_throughput(runners, rounds, one_pass=lambda runner: runner.one_pass())
                for name in names:
                    ours = figures["loader", name]
                    result = {"loader": name, "resolution": resolution, "batch_size": batch_size,
                              "workers": spec.workers(), "device": device, "rounds": rounds, "images_per_s": ours}
                    for baseline in baselines:
                        key = _baseline_key(baseline, name)
                        result[f"{baseline}_images_per_s"] = figures[key]
                        result[f"ratio_vs_{baseline}"] = ours / figures[key]
                        # the ratio within each round, where the pipelines ran back to back: how much is noise
                        result[f"round_ratios_vs_{baseline}"] = [mine / theirs for mine, theirs in
                                                                 zip(passes["loader", name], passes[key])]
                    yield result
        finally:
            for runner in runners.values():
                runner.close()


def bench_loader(name: str, data: str, resolution: int, batch_size: int, workers: int, device: str,
                 baselines: list[str], rounds: int = 3, options: LoaderConfig | None = None) -> dict:
    """bench_loaders for one backend at one resolution, in this process."""
    return next(iter(bench_loaders([name], data, [resolution], batch_size, workers, device, baselines, rounds,
                                   options)))


def loader_table(results: list[dict], baselines: list[str]) -> str:
    """`bench loader`'s results, readable: one line per (backend, resolution) with its images/s, and each baseline's
    images/s and the backend's ratio to it (x <baseline>)."""
    lines = [f"{'loader':>11} {'px':>4} {'images/s':>9}" + "".join(
        f" {baseline + ' images/s':>20} {'x ' + baseline:>13}" for baseline in baselines)]
    for r in results:
        lines.append(f"{r['loader']:>11} {r['resolution']:>4} {r['images_per_s']:>9.1f}" + "".join(
            f" {r[baseline + '_images_per_s']:>20.1f} {r['ratio_vs_' + baseline]:>13.3f}" for baseline in baselines))
    return "\n".join(lines)


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
    ratio, and what an epoch of the loader's data takes at that shape (epoch_s: its images at that batch size over
    the loader-fed images/s; what each stage of a progressive schedule costs an epoch). Both are built as `train` builds its run, so the model, compile, precision and optimizer are the same.
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
        epoch_images = len(real.train_loader) * row.micro_batch  # this process's share, as its images/s
        yield {"loader": cfg.loader.name, "resolution": row.resolution, "batch_size": row.micro_batch,
               "accum_steps": row.accum_steps, "first_epoch": row.epoch, "model": cfg.model.arch,
               "device": str(rt.device), "precision": rt.precision, "compile": rt.compile, "steps": steps,
               "rounds": rounds, **figures,
               "loader_efficiency": figures["images_per_s"] / figures["synthetic_images_per_s"],
               "epoch_images": epoch_images, "epoch_s": epoch_images / figures["images_per_s"]}


def train_table(results: list[dict]) -> str:
    """`bench train`'s results, readable: one line per shape."""
    lines = [f"{'resolution (px)':>15} {'batch (images)':>14} {'loader (images/s)':>17} "
             f"{'synthetic (images/s)':>20} {'efficiency (loader/synthetic)':>29} {'epoch (s)':>10}"]
    for r in results:
        lines.append(f"{r['resolution']:>15} {r['batch_size']:>14} {r['images_per_s']:>17.1f} "
                     f"{r['synthetic_images_per_s']:>20.1f} {r['loader_efficiency']:>29.3f} {r['epoch_s']:>10.1f}")
    return "\n".join(lines)
