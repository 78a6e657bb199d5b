"""`fastimagenet show-batch`: one batch exactly as a loader delivers it to the model (after crop and flip, before
normalisation), drawn as a labelled grid — the first thing to look at when accuracy is off."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fastimagenet import loaders
from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError
from fastimagenet.config import Config
from fastimagenet.loaders.base import LoaderSpec

BORDER = 2  # pixels between tiles
CAPTION = 14  # pixels under each tile for the class name


def first_batch(cfg: Config, train: bool, resolution: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    list[str]]:
    """The first batch of epoch 0 (uint8 NCHW on the CPU), its labels and the class names."""
    path = cfg.data.train if train else cfg.data.val
    if not path:
        raise UserError("show-batch: give the split with --data")
    spec = LoaderSpec(path=path, train=train, resolution=resolution, batch_size=batch_size,
                      device=torch.device("cpu"), augment=cfg.data, options=cfg.loader, seed=cfg.runtime.seed,
                      strict=cfg.data.strict, num_classes=cfg.data.num_classes)
    loader = loaders.build_loader(cfg.loader.name, spec)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    return images.cpu(), labels.cpu(), loader.classes


def grid(images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> Image.Image:
    """Tiles of side `resolution` in rows of up to 8, each with its class name underneath, on a white sheet."""
    count, _, side, _ = images.shape
    columns = min(8, count)
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (columns * (side + BORDER) + BORDER, rows * (side + CAPTION + BORDER) + BORDER),
                      "white")
    draw = ImageDraw.Draw(sheet)
    pixels = images.permute(0, 2, 3, 1).contiguous().numpy()  # NHWC for PIL
    for i in range(count):
        left, top = tile_origin(i, columns, side)
        sheet.paste(Image.fromarray(np.ascontiguousarray(pixels[i])), (left, top))
        name = classes[int(labels[i])]
        draw.text((left, top + side + 1), name[: max(1, side // 6)], fill="black")
    return sheet


def tile_origin(index: int, columns: int, side: int) -> tuple[int, int]:
    """Top-left pixel of tile `index` on the sheet."""
    row, column = divmod(index, columns)
    return BORDER + column * (side + BORDER), BORDER + row * (side + CAPTION + BORDER)


def show_batch(cfg: Config, out: Path, train: bool, resolution: int, batch_size: int) -> Path:
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: show-batch writes a PNG; give a path ending in .png")
    images, labels, classes = first_batch(cfg, train, resolution, batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        grid(images, labels, classes).save(tmp, format="png")
    return out
