"""Schedules as pure functions: the resolution ramp of an epoch, and the learning rate at a point of the run.

Progress is measured in epochs (a float), not steps: with progressive resizing the batch size, and so the number
of steps per epoch, changes between stages, while "80% through the run" stays well defined. The plan
(fastimagenet/plan.py) evaluates these once per epoch; the loop asks the plan, never these functions directly.
"""

from __future__ import annotations

import math

from fastimagenet.config import Config, ScheduleConfig


def round_to(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def ramp_resolution(epoch: int, epochs: int, s: ScheduleConfig) -> int:
    """Training resolution of an epoch on the ramp from min to max resolution between the ramp_start and ramp_end
    fractions of the run, rounded to a multiple of resolution_step (which bounds the number of compiled shapes)."""
    start, end = s.ramp_start * epochs, s.ramp_end * epochs
    if epoch <= start or s.min_resolution == s.max_resolution:
        value = s.min_resolution
    elif epoch >= end:
        value = s.max_resolution
    else:
        value = s.min_resolution + (s.max_resolution - s.min_resolution) * (epoch - start) / (end - start)
    return round_to(value, s.resolution_step)


def lr_factor(progress: float, s: ScheduleConfig) -> float:
    """Multiplier of the peak LR at `progress` in [0, 1] of the run (warm-up included)."""
    end = s.end_lr_ratio
    if s.lr in ("linear_ramp", "onecycle"):
        peak = max(s.peak, s.warmup)
        if progress < peak:
            return progress / peak if peak > 0 else 1.0
        t = (progress - peak) / max(1e-12, 1 - peak)
        shape = 1 - t if s.lr == "linear_ramp" else 0.5 * (1 + math.cos(math.pi * t))
        return end + (1 - end) * shape
    if progress < s.warmup:
        return progress / s.warmup
    if s.lr == "cosine":
        t = (progress - s.warmup) / max(1e-12, 1 - s.warmup)
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))
    if s.lr == "step":
        return s.gamma ** sum(progress >= m for m in s.milestones)
    if s.lr == "plateau":  # the drops come from validation (fastimagenet/plateau.py), not from the plan
        return 1.0
    raise AssertionError(s.lr)


def lr_at(progress: float, batch_size: int, cfg: Config) -> float:
    """Absolute LR: optim.lr is per 256 images, scaled linearly with the current stage's global batch."""
    return cfg.optim.lr * batch_size / 256 * lr_factor(progress, cfg.schedule)
