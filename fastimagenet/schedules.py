"""Schedules as pure functions of the epoch (resolution, batch size) or of run progress (learning rate).

Progress is measured in epochs (a float), not steps: with progressive resizing the batch size, and so the number
of steps per epoch, changes between stages, while "80% through the run" stays well defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastimagenet.config import Config, ScheduleConfig
from fastimagenet.errors import UserError


@dataclass(frozen=True)
class Stage:
    start_epoch: int
    resolution: int
    batch_size: int


def parse_stages(text: str, epochs: int) -> list[Stage]:
    """Parse "epoch,resolution,batch;epoch,resolution,batch;..." (the first stage must start at epoch 0)."""
    if not text.strip():
        return []
    stages = []
    for part in text.split(";"):
        if not part.strip():
            continue
        try:
            epoch, resolution, batch = (int(v) for v in part.split(","))
        except ValueError:
            raise UserError(
                f"config: 'schedule.stages' entry '{part.strip()}' is not 'epoch,resolution,batch' "
                "(e.g. schedule.stages=\"0,128,512;6,160,384;12,192,256\")"
            ) from None
        if resolution <= 0 or batch <= 0 or epoch < 0:
            raise UserError(f"config: 'schedule.stages' entry '{part.strip()}': resolution and batch must be > 0")
        stages.append(Stage(epoch, resolution, batch))
    starts = [s.start_epoch for s in stages]
    if starts[0] != 0 or starts != sorted(set(starts)):
        raise UserError("config: 'schedule.stages' must start at epoch 0 with increasing start epochs")
    if starts[-1] >= epochs:
        raise UserError(f"config: 'schedule.stages' has a stage at epoch {starts[-1]} but the run has {epochs} epochs")
    return stages


def _round_to(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def resolution_at(epoch: int, cfg: Config) -> int:
    """Training resolution of an epoch: the explicit stage it falls in, or a ramp rounded to a multiple of step."""
    stages = parse_stages(cfg.schedule.stages, cfg.epochs)
    if stages:
        return _stage_at(epoch, stages).resolution
    s = cfg.schedule
    start, end = s.ramp_start * cfg.epochs, s.ramp_end * cfg.epochs
    if epoch <= start or s.min_resolution == s.max_resolution:
        value = s.min_resolution
    elif epoch >= end:
        value = s.max_resolution
    else:
        value = s.min_resolution + (s.max_resolution - s.min_resolution) * (epoch - start) / (end - start)
    return _round_to(value, s.resolution_step)


def batch_size_at(epoch: int, cfg: Config) -> int:
    """Global batch size of an epoch: the stage's, or optim.batch_size when the schedule is a ramp."""
    stages = parse_stages(cfg.schedule.stages, cfg.epochs)
    return _stage_at(epoch, stages).batch_size if stages else cfg.optim.batch_size


def _stage_at(epoch: int, stages: list[Stage]) -> Stage:
    return [s for s in stages if s.start_epoch <= epoch][-1]


def val_resolution(cfg: Config) -> int:
    return cfg.data.val_resolution or resolution_at(cfg.epochs - 1, cfg)


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
    raise AssertionError(s.lr)


def lr_at(progress: float, batch_size: int, cfg: Config) -> float:
    """Absolute LR: optim.lr is per 256 images, scaled linearly with the current stage's global batch."""
    return cfg.optim.lr * batch_size / 256 * lr_factor(progress, cfg.schedule)


def schedule_table(cfg: Config) -> str:
    """One row per epoch, printed before training so a run's plan is visible before it costs anything."""
    rows = [f"{'epoch':>5} {'res':>5} {'batch':>6} {'lr(start)':>10}"]
    for epoch in range(cfg.epochs):
        bs = batch_size_at(epoch, cfg)
        rows.append(f"{epoch:>5} {resolution_at(epoch, cfg):>5} {bs:>6} {lr_at(epoch / cfg.epochs, bs, cfg):>10.4f}")
    rows.append(f"eval at {val_resolution(cfg)} px")
    return "\n".join(rows)
