"""`fastimagenet bench loader`: images/s of a loader backend on its own (no model), with same-run baselines."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

import loaders
from fastimagenet.config import DataConfig, LoaderConfig
from fastimagenet.errors import UserError
from loaders.base import LoaderSpec


def _one_pass(iterable) -> float:
    images, batch = 0, None
    start = time.perf_counter()
    for batch, labels in iterable:
        images += labels.shape[0]
    if batch is not None and batch.is_cuda:
        torch.cuda.synchronize()  # sync: the pass ends when the device has the last batch
    return images / (time.perf_counter() - start)


def compare_throughput(pipelines: dict, rounds: int) -> dict[str, float]:
    """Median images/s of each pipeline over `rounds` timed passes, after one untimed pass each (worker start-up,
    JIT compiles, cold page cache). The pipelines take turns in a rotating order, so a change of load on the
    machine during the run hits every one of them alike."""
    for iterable in pipelines.values():
        _one_pass(iterable)
    names = list(pipelines)
    figures = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            figures[name].append(_one_pass(pipelines[name]))
    return {name: statistics.median(values) for name, values in figures.items()}


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
    from dataset_tools.convert import read_sidecar

    return read_sidecar(data)["source"]


def bench_loader(name: str, data: str, resolution: int, batch_size: int, workers: int, device: str,
                 baselines: list[str], rounds: int = 3, options: LoaderConfig | None = None) -> dict:
    options = options or LoaderConfig(name=name, workers=workers)
    workers = workers or os.cpu_count() or 1
    spec = LoaderSpec(path=data, train=True, resolution=resolution, batch_size=batch_size,
                      device=torch.device(device), augment=DataConfig(), options=options, path_key="--data",
                      batch_key="--batch-size")
    pipelines = {"images_per_s": loaders.build_loader(name, spec)}
    for baseline in baselines:
        if baseline == "torchvision":
            pipeline = torchvision_reference(image_folder_of(data), resolution, batch_size, workers)
        else:
            pipeline = loaders.build_raw_pipeline(name, spec)
        pipelines[f"{baseline}_images_per_s"] = pipeline
    figures = compare_throughput(pipelines, rounds)
    result = {"loader": name, "resolution": resolution, "batch_size": batch_size, "workers": workers,
              "device": device, "rounds": rounds, **figures}
    for baseline in baselines:
        result[f"ratio_vs_{baseline}"] = figures["images_per_s"] / figures[f"{baseline}_images_per_s"]
    return result


def print_result(result: dict) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
