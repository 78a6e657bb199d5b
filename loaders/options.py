"""The `loader.*` config section: the settings every backend shares, then one section per backend that has options
of its own (its dataclass lives in that backend's options module). fastimagenet/config.py composes this section into
the run's Config; loaders/ imports nothing of the config, so the dependency runs one way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fastimagenet.common.errors import UserError
from fastimagenet.loaders.augment import Augmentation
from fastimagenet.loaders.dali_options import DaliOptions
from fastimagenet.loaders.ffcv_options import FfcvOptions


@dataclass
class LoaderConfig:
    name: str = "torchvision"  # torchvision | dali | ffcv | synthetic
    workers: int = 0  # 0: this process's share of the CPUs (affinity / LOCAL_WORLD_SIZE), half of it for val
    synthetic_samples: int = 4096  # images per epoch for the synthetic loader
    # sharded datasets (loaders/shard_source.py): where a node keeps its copies of remote shards and .beton files
    # ("": $FASTIMAGENET_CACHE/objects), how much of the disk they may take, and the samples an epoch shuffles
    # together (groups of consecutive shards of at least this many: the order is computed, so a group costs cache
    # space, not memory)
    cache_dir: str = ""
    cache_gb: float = 100.0
    shuffle_buffer: int = 16384
    # one section per backend with options, named as the backend (the config key is loader.<backend>.<option>)
    dali: DaliOptions = field(default_factory=DaliOptions)
    ffcv: FfcvOptions = field(default_factory=FfcvOptions)


def _sections(loader: LoaderConfig) -> dict[str, object]:
    return {f.name: getattr(loader, f.name) for f in dataclasses.fields(loader)
            if dataclasses.is_dataclass(getattr(loader, f.name))}


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the backends' string options, by dotted config key (e.g. 'loader.ffcv.order')."""
    return {f"loader.{name}.{key}": allowed for name, section in _sections(LoaderConfig()).items()
            for key, allowed in section.CHOICES.items()}


def check(loader: LoaderConfig, data: Augmentation) -> None:
    """Each backend's checks of its own section; the chosen backend also checks the `data.*` settings it reads."""
    if loader.cache_gb <= 0 or loader.shuffle_buffer < 1:
        raise UserError(f"config: need loader.cache_gb > 0 and loader.shuffle_buffer >= 1, got {loader.cache_gb}, "
                        f"{loader.shuffle_buffer}")
    for name, section in _sections(loader).items():
        section.check(data, chosen=name == loader.name)
