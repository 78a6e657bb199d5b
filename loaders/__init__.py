"""Loader backends behind one protocol (loaders/base.py). Backends are imported lazily: a missing optional package
fails only when that backend is chosen, with the command that installs it.

This registry is the one list of backend names (the config and the command line take theirs from here), so it
imports nothing else of the package: the config can read the names without importing any backend. A backend's line
says what it reads; its module may add hooks the generic code looks for: `raw_pipeline` (the benchmark's baseline),
`data_from_folder` (an image folder in the form it reads), `source_folder` (the image folder a file of that form was
made from) and `demo_data` (the demo's data in that form).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from fastimagenet.common.errors import UserError

if TYPE_CHECKING:
    from fastimagenet.loaders.base import Loader, LoaderSpec


# What a backend that reads image folders reads: every such backend reads sharded splits too (loaders/shard_source.py).
_FOLDER = "an ImageFolder directory, or a sharded split (a folder or an s3:// prefix)"


class _Backend(NamedTuple):
    module: str  # its Loader class and hooks (see above), imported only when the backend is used
    cls: str
    install: str  # how to install what it needs
    reads: str = _FOLDER  # what data.train / data.val name for it; "": it makes its data up


# The one line each backend adds here; a backend with options of its own also adds its section to loaders/options.py.
_BACKENDS = {
    "torchvision": _Backend("fastimagenet.loaders.torchvision_loader", "TorchvisionLoader",
                            "pip install torchvision pillow"),
    "synthetic": _Backend("fastimagenet.loaders.synthetic", "SyntheticLoader", "pip install torch", reads=""),
    "dali": _Backend("fastimagenet.loaders.dali_loader", "DaliLoader", "pip install nvidia-dali-cuda120"),
    "ffcv": _Backend("fastimagenet.loaders.ffcv_loader", "FfcvLoader",
                     "apt-get install pkg-config libopencv-dev libturbojpeg0-dev && pip install ffcv numba",
                     reads="a .beton file (a path or an s3:// URL)"),
}

NAMES = tuple(_BACKENDS)


def _known(name: str) -> _Backend:
    if name not in _BACKENDS:
        raise UserError(f"unknown loader '{name}' (choose one of {', '.join(NAMES)})")
    return _BACKENDS[name]


def _backend_module(name: str):
    module_name, _, install, _ = _known(name)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] == "fastimagenet":
            raise  # our own bug, not a missing package
        raise UserError(f"the '{name}' loader needs '{exc.name}', which is not installed: {install}") from None


def missing_package(name: str) -> str | None:
    """None when the backend `name` imports, else the message naming what it lacks and how to install it."""
    try:
        _backend_module(name)
    except UserError as exc:
        return str(exc)
    return None


def reads(name: str) -> str:
    """What data.train / data.val name for backend `name`, e.g. "a .beton file"; "" when it makes its data up."""
    return _known(name).reads


def reads_folders(name: str) -> bool:
    """Whether backend `name` reads image folders (and so sharded splits too)."""
    return reads(name) == _FOLDER


def check_data_path(name: str, spec: LoaderSpec) -> None:
    """An unset path must not reach a backend: read as a path, "" is the current directory. Checked here, once for
    every backend and every command, naming the setting that is missing."""
    if reads(name) and not str(spec.path).strip():
        split = "train" if spec.train else "validation"
        raise UserError(f"no {split} data given: set {spec.path_setting()} ({reads(name)} for the '{name}' loader)")


def build_loader(name: str, spec: LoaderSpec) -> Loader:
    check_data_path(name, spec)
    return getattr(_backend_module(name), _BACKENDS[name].cls)(spec)


def build_raw_pipeline(name: str, spec: LoaderSpec):
    """The backend's library used by hand, doing the same work: the baseline our wrapper must keep up with."""
    check_data_path(name, spec)
    module = _backend_module(name)
    if not hasattr(module, "raw_pipeline"):
        raise UserError(f"the '{name}' loader has no raw-library baseline")
    return module.raw_pipeline(spec)


def data_from_folder(name: str, folder: str | Path, scratch: str | Path, workers: int = 0) -> str | Path:
    """What backend `name` reads of the images of the ImageFolder `folder`: the folder itself, or those images in the
    backend's own form, written once into the directory `scratch` (its `data_from_folder`)."""
    convert = getattr(_backend_module(name), "data_from_folder", None)
    return convert(folder, scratch, workers) if convert else folder


def image_folder_of(path: str | Path) -> Path:
    """The ImageFolder behind data `path`: the directory itself, the folder a sharded split was written from, or the
    folder a backend's file was made from (the `source_folder` of the backends that read files)."""
    from fastimagenet.dataset_tools.shards import is_shard_dataset, read_index

    if not str(path).strip():  # Path("") would be the current directory
        raise UserError("no image folder given")
    if is_shard_dataset(path):
        return Path(read_index(str(path)).settings["source"])
    if Path(path).is_dir():
        return Path(path)
    for name, backend in _BACKENDS.items():
        if backend.reads in (_FOLDER, ""):
            continue
        source = getattr(_backend_module(name), "source_folder", None)
        folder = source(path) if source else None
        if folder is not None:
            return Path(folder)
    raise UserError(f"{path}: neither an image folder nor a file made from one")


def data_for(name: str, path: str | Path, scratch: str | Path, workers: int = 0) -> str:
    """What backend `name` reads of the images of `path` (an ImageFolder, or a file a backend reads): its image
    folder for a backend that reads folders, else `data_from_folder` (which keeps a file already in its form)."""
    if reads_folders(name):
        return str(image_folder_of(path))
    return str(data_from_folder(name, path, scratch, workers))


def demo_data(name: str, home: Path) -> tuple[Path, Path] | None:
    """The demo's (train, val) data in the form backend `name` reads, made once under `home`; None for a backend
    that reads image folders (the demo's default)."""
    make = getattr(_backend_module(name), "demo_data", None)
    return make(home) if make else None
