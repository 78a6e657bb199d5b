"""`fastimagenet bench loader`: images/s of a loader backend on its own (no model), with same-run baselines."""

from __future__ import annotations

import json
import os
import time

import torch

import loaders
from fastimagenet.config import LoaderConfig
from loaders.augment import Augment
from loaders.base import LoaderSpec


def time_second_pass(iterable_factory, passes: int = 2) -> float:
    """images/s of the last of `passes` full passes: the first pays for worker start-up and a cold page cache."""
    iterable = iterable_factory()
    for p in range(passes):
        images = 0
        start = time.perf_counter()
        for batch, labels in iterable:
            images += labels.shape[0]
        if batch.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return images / seconds


def torchvision_reference(data: str, resolution: int, batch_size: int, workers: int) -> float:
    """The plain pipeline users start from: ImageFolder + RandomResizedCrop + flip + PILToTensor in a DataLoader."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(resolution),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])
    dataset = datasets.ImageFolder(data, transform=transform)
    return time_second_pass(lambda: torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0))


def image_folder_of(data: str) -> str:
    """The ImageFolder behind a benchmark's data: the folder itself, or the one a .beton was converted from."""
    if not data.endswith(".beton"):
        return data
    from dataset_tools.convert import read_sidecar

    return read_sidecar(data)["source"]


def bench_loader(name: str, data: str, resolution: int, batch_size: int, workers: int, device: str,
                 baselines: list[str], options: LoaderConfig | None = None) -> dict:
    options = options or LoaderConfig(name=name, workers=workers)
    workers = workers or os.cpu_count() or 1
    spec = LoaderSpec(path=data, train=True, resolution=resolution, batch_size=batch_size,
                      device=torch.device(device), augment=Augment(), options=options)
    result = {"loader": name, "resolution": resolution, "batch_size": batch_size, "workers": workers,
              "device": device, "images_per_s": time_second_pass(lambda: loaders.build_loader(name, spec))}
    for baseline in baselines:
        if baseline == "torchvision":
            figure = torchvision_reference(image_folder_of(data), resolution, batch_size, workers)
        else:
            figure = time_second_pass(lambda: loaders.build_raw_pipeline(name, spec))
        result[f"{baseline}_images_per_s"] = figure
        result[f"ratio_vs_{baseline}"] = result["images_per_s"] / figure
    return result


def print_result(result: dict) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
