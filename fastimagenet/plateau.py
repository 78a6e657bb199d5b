"""schedule.lr=plateau: the LR drops by a factor whenever validation top-1 stops improving.

The plan's LR (the warm-up, then the peak, scaled with each stage's batch: fastimagenet/schedules.py) is multiplied
by `scale`, which drops by `schedule.plateau_factor` after `schedule.plateau_patience` validated epochs in a row
whose val top-1 did not beat the best by `schedule.plateau_threshold`, down to `schedule.plateau_min_lr_ratio`.
The decision reads only validation figures, which every rank holds alike after their all-reduce, so under DDP
every rank takes it at the same epoch. Its state is in every checkpoint: a resumed run drops where the
uninterrupted one drops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Plateau:
    factor: float
    patience: int  # validated epochs without improvement before a drop
    min_scale: float
    threshold: float  # top-1 (a fraction) that counts as an improvement
    best: float = -math.inf
    flat: int = 0  # validated epochs since the best one (or the last drop)
    scale: float = 1.0

    def observe(self, top1: float) -> bool:
        """A validated epoch's top-1; True when it lowers the LR (from the next epoch on)."""
        if top1 > self.best + self.threshold:
            self.best, self.flat = top1, 0
            return False
        self.flat += 1
        if self.flat < self.patience or self.scale <= self.min_scale:
            return False
        self.scale, self.flat = max(self.min_scale, self.scale * self.factor), 0
        return True

    def state_dict(self) -> dict:
        return {"best": self.best, "flat": self.flat, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.flat, self.scale = state["best"], state["flat"], state["scale"]


def plateau_of(schedule) -> Plateau | None:
    """The run's plateau state (schedule.lr=plateau), or None."""
    if schedule.lr != "plateau":
        return None
    return Plateau(schedule.plateau_factor, schedule.plateau_patience, schedule.plateau_min_lr_ratio,
                   schedule.plateau_threshold)
