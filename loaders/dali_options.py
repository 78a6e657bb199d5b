"""The DALI backend's config section (`loader.dali.*`) and the checks of its settings. Kept apart from
loaders/dali_loader.py, which imports DALI: the config is validated on machines without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fastimagenet.common.errors import UserError
from fastimagenet.loaders.augment import Augmentation


@dataclass
class DaliOptions:
    device: str = "auto"  # gpu (mixed decode) | cpu | auto (gpu when training on CUDA)
    threads: int = 0  # 0: loader.workers, or its default (the process's share of the CPUs) when that is 0 too
    hw_decoder_load: float = 0.65  # share of JPEG decode sent to the A100/H100 hardware decoder
    prefetch: int = 2  # batches prepared ahead

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"device": ("auto", "gpu", "cpu")}

    def check(self, data: Augmentation, chosen: bool) -> None:
        """Reject settings DALI cannot run (whether or not the run reads with DALI: the section is saved with it)."""
        if self.prefetch < 1 or self.threads < 0 or not 0 <= self.hw_decoder_load <= 1:
            raise UserError(f"config: need loader.dali.prefetch >= 1, loader.dali.threads >= 0 and "
                            f"0 <= loader.dali.hw_decoder_load <= 1, got {self.prefetch}, {self.threads}, "
                            f"{self.hw_decoder_load}")
