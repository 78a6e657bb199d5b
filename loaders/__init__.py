"""Loader backends behind one protocol (loaders/base.py). Backends are imported lazily: a missing optional package
fails only when that backend is chosen, with the command that installs it.

This registry is the one list of backend names (the config and the command line take theirs from here), so it
imports nothing else of the package: the config can read the names without importing any backend.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fastimagenet.errors import UserError

if TYPE_CHECKING:
    from loaders.base import Loader, LoaderSpec

# name -> (module, class, how to install what it needs)
_BACKENDS = {
    "torchvision": ("loaders.torchvision_loader", "TorchvisionLoader", "pip install torchvision pillow"),
    "synthetic": ("loaders.synthetic", "SyntheticLoader", "pip install torch"),
    "dali": ("loaders.dali_loader", "DaliLoader", "pip install nvidia-dali-cuda120"),
    "ffcv": (
        "loaders.ffcv_loader",
        "FfcvLoader",
        "apt-get install pkg-config libopencv-dev libturbojpeg0-dev && pip install ffcv numba",
    ),
}

NAMES = tuple(_BACKENDS)
_READS_NO_FILES = ("synthetic",)  # backends that make their data up and ignore LoaderSpec.path


def _backend_module(name: str):
    if name not in _BACKENDS:
        raise UserError(f"unknown loader '{name}' (choose one of {', '.join(NAMES)})")
    module_name, _, install = _BACKENDS[name]
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in ("loaders", "fastimagenet", "dataset_tools"):
            raise  # our own bug, not a missing package
        raise UserError(f"the '{name}' loader needs '{exc.name}', which is not installed: {install}") from None


def missing_package(name: str) -> str | None:
    """None when the backend `name` imports, else the message naming what it lacks and how to install it."""
    try:
        _backend_module(name)
    except UserError as exc:
        return str(exc)
    return None


def check_data_path(name: str, spec: LoaderSpec) -> None:
    """An unset path must not reach a backend: read as a path, "" is the current directory. Checked here, once for
    every backend and every command, naming the setting that is missing."""
    if name not in _READS_NO_FILES and not str(spec.path).strip():
        split = "train" if spec.train else "validation"
        what = "an ImageFolder directory" if name != "ffcv" else "a .beton file"
        raise UserError(f"no {split} data given: set {spec.path_setting()} ({what} for the '{name}' loader)")


def build_loader(name: str, spec: LoaderSpec) -> Loader:
    check_data_path(name, spec)
    return getattr(_backend_module(name), _BACKENDS[name][1])(spec)


def build_raw_pipeline(name: str, spec: LoaderSpec):
    """The backend's library used by hand, doing the same work: the baseline our wrapper must keep up with."""
    check_data_path(name, spec)
    module = _backend_module(name)
    if not hasattr(module, "raw_pipeline"):
        raise UserError(f"the '{name}' loader has no raw-library baseline (only dali and ffcv do)")
    return module.raw_pipeline(spec)

