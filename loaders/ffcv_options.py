"""The FFCV backend's config section (`loader.ffcv.*`) and the checks of its settings. Kept apart from
loaders/ffcv_loader.py, which imports FFCV and numba: the config is validated on machines without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools.image_rules import MIN_STORED_SIDE
from fastimagenet.loaders.augment import Augmentation


@dataclass
class FfcvOptions:
    order: str = "random"  # random | quasi_random
    os_cache: bool = True  # memory-map the file (OS page cache, shared by the processes); false: per-process pages
    verify: str = "first-epoch"  # off | first-epoch | always: each batch's records against convert's checksums

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "order": ("random", "quasi_random"),
        "verify": ("off", "first-epoch", "always"),
    }

    def check(self, data: Augmentation, chosen: bool) -> None:
        """Reject settings FFCV cannot run; `chosen`: the run reads with FFCV, so the `data.*` crops must suit it."""
        if not self.os_cache and self.order != "quasi_random":
            # without the OS cache FFCV holds every page from the first to the last batch that needs it, which in a
            # random order is about the whole file, in every process
            raise UserError("config: 'loader.ffcv.os_cache=false' needs 'loader.ffcv.order=quasi_random' (with "
                            f"'loader.ffcv.order={self.order}' each process would hold about the whole file "
                            "in memory); keep loader.ffcv.os_cache=true or set loader.ffcv.order=quasi_random")
        if chosen:
            _check_crops(data)


def _check_crops(data: Augmentation) -> None:
    """FFCV's decoders crop without a lower bound, and an empty crop aborts the whole process inside OpenCV's resize.
    Refuse settings that give one on the smallest images convert stores (MIN_STORED_SIDE pixels a side)."""
    side = MIN_STORED_SIDE
    smallest = f"an image with a {side}-pixel side, the smallest `fastimagenet convert` stores"
    if int(data.crop_ratio * side) == 0:  # the centre crop: int(crop_ratio * shorter side) pixels
        raise UserError(f"config: 'data.crop_ratio={data.crop_ratio}' makes FFCV's centre crop 0 pixels wide on "
                        f"{smallest} (FFCV crops int(crop_ratio * shorter side)), which aborts the process; with "
                        f"--loader ffcv use at least 1/{side} = {1 / side}")
    low, high = data.ratio
    # When no drawn crop fits, the random-resized crop takes the whole image cut to the aspect-ratio range: an image
    # `side` pixels wide keeps round(side / low) rows, one `side` pixels high round(side * high) columns. data.scale
    # has no such case: a draw with an empty side is drawn again, then this fallback is taken.
    if round(side / low) == 0 or round(side * high) == 0:
        raise UserError(f"config: 'data.ratio={low},{high}' makes FFCV's random-resized crop 0 pixels high or wide "
                        f"on {smallest} (when no drawn crop fits, FFCV keeps round({side} / min) rows or "
                        f"round({side} * max) columns), which aborts the process; with --loader ffcv keep "
                        f"min < {2 * side} and max > 1/{2 * side}")

