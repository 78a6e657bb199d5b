"""Scan an ImageFolder tree (root/<class>/<image>) into (path, label) samples with a fixed class -> index map.

Images in sub-folders of a class folder belong to that class (as in torchvision's ImageFolder); hidden files and
folders are ignored; anything else that is not an image file (by extension) is listed in `skipped`, which every
backend reports. Whether an image file decodes is dataset_tools/verify.py's question.

The train split decides the class list (sorted directory names); every other split and every loader backend reuses
it, so label 3 means the same class everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fastimagenet.common.errors import UserError

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
        for path in _class_files(class_dir, skipped):
            if not os.path.isfile(path):  # a dangling link, a socket, ...
                skipped[path] = "not a file (a broken symbolic link?)" if os.path.islink(path) else "not a file"
            elif path.lower().endswith(IMAGE_EXTENSIONS):
                images.append((path, index[name]))
            else:
                skipped[path] = "not an image file extension"
        if not images:
            raise UserError(f"{class_dir}: class directory has no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += images
    return FolderScan(root, list(classes), samples, skipped)


def _class_files(class_dir: Path, skipped: dict[str, str]) -> list[str]:
    """Every non-directory entry under a class folder, sub-folders included (as torchvision's ImageFolder walks
    them, links to folders followed), sorted by path. Hidden names (.DS_Store, macOS's ._* twins, .ipynb_checkpoints)
    are left out without a report; a folder reached twice through links is reported once and not walked again."""
    files, seen = [], set()
    for top, dirs, names in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            skipped[top] = "a folder already listed through another link (a link loop?)"
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(top, n) for n in names if not n.startswith(".")]
    return sorted(files)
