"""Scan an ImageFolder tree (root/<class>/<image>) into (path, label) samples with a fixed class -> index map.

The train split decides the class list (sorted directory names); every other split and every loader backend reuses
it, so label 3 means the same class everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fastimagenet.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class FolderScan:
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, label), sorted by class then file name
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it is not a sample


def scan_image_folder(root: str | os.PathLike, classes: list[str] | None = None) -> FolderScan:
    """List the images of a split. `classes`: the train split's class list, when scanning another split."""
    if not str(root).strip():  # Path("") would be the current directory
        raise UserError("no data directory given (set data.train / data.val)")
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: data directory does not exist")
    if not root.is_dir():
        if root.suffix == ".beton":
            raise UserError(f"{root}: a .beton file is read by the ffcv loader: use --loader ffcv (loader.name=ffcv), "
                            "or give this loader the ImageFolder directory")
        raise UserError(f"{root}: expected an ImageFolder directory (root/<class>/<image>), found a file")
    found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not found:
        raise UserError(f"{root}: no class sub-directories (expected {root}/<class>/<image>)")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(f"{root}: classes not present in the train split: {', '.join(unknown[:10])}")
    index = {name: i for i, name in enumerate(classes)}
    samples, skipped = [], {}
    for name in found:
        class_dir = root / name
        images = []
        for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if not entry.is_file():
                skipped[entry.path] = "not a file"
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                images.append((entry.path, index[name]))
            else:
                skipped[entry.path] = "not an image file extension"
        if not images:
            raise UserError(f"{class_dir}: class directory has no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += images
    return FolderScan(root, list(classes), samples, skipped)
