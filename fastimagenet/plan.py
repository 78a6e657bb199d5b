"""The run's plan: the recipe turned into data once, at start-up — one row per epoch.

Everything that depends on the schedule reads the plan: the training loop (resolution and batch pushed into the
loader, the LR of each step), the printed table, the number of compiled shapes, `recipes NAME`, `lr-find` and
resume. Nothing else looks at `schedule.stages` or the ramp settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastimagenet.config import Config
from fastimagenet.schedules import lr_at, ramp_resolution


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    resolution: int  # training images are decoded at this size (pixels, square)
    batch_size: int  # global images per optimizer step, all ranks together
    accum_steps: int  # micro-batches per optimizer step
    lr_start: float  # absolute LR at the epoch's first step
    new_shape: bool  # first epoch at this (resolution, micro-batch): torch.compile builds a graph for it

    @property
    def micro_batch(self) -> int:
        """Global images per forward/backward: what the loader delivers per step, all ranks together."""
        return self.batch_size // self.accum_steps


@dataclass(frozen=True)
class Plan:
    rows: tuple[EpochPlan, ...]
    val_resolution: int
    val_batch_size: int  # global
    cfg: Config  # the LR schedule's settings, for `lr`

    @property
    def epochs(self) -> int:
        return len(self.rows)

    @property
    def compiled_shapes(self) -> int:
        """Graphs a compiled run builds: one per distinct training shape, plus the eval shape."""
        return sum(row.new_shape for row in self.rows) + 1

    def lr(self, epoch: int, step: int, steps: int) -> float:
        """LR at step `step` of `steps` in `epoch` (step == steps: the epoch's end)."""
        return lr_at((epoch + step / steps) / self.epochs, self.rows[epoch].batch_size, self.cfg)

    def lr_end(self, epoch: int) -> float:
        """LR after the epoch's last step (what metrics.jsonl records as the epoch's `lr`)."""
        return self.lr(epoch, 1, 1)

    def table(self) -> str:
        """One row per epoch, printed before training so a run's plan is visible before it costs anything."""
        lines = [f"{'epoch':>5} {'res':>5} {'batch':>6} {'accum':>5} {'lr(start)':>10}  compiles"]
        for r in self.rows:
            lines.append(f"{r.epoch:>5} {r.resolution:>5} {r.batch_size:>6} {r.accum_steps:>5} {r.lr_start:>10.4f}"
                         + ("  new graph" if r.new_shape else ""))
        lines.append(f"eval at {self.val_resolution} px")
        return "\n".join(lines)


def build_plan(cfg: Config) -> Plan:
    """Explicit stages when the recipe gives them, else the resolution ramp at optim.batch_size."""
    stages = cfg.schedule.stages
    rows, shapes = [], set()
    for epoch in range(cfg.epochs):
        if stages:
            stage = [s for s in stages if s.epoch <= epoch][-1]
            resolution, batch_size = stage.resolution, stage.batch
        else:
            resolution, batch_size = ramp_resolution(epoch, cfg.epochs, cfg.schedule), cfg.optim.batch_size
        shape = (resolution, batch_size // cfg.optim.accum_steps)
        rows.append(EpochPlan(epoch, resolution, batch_size, cfg.optim.accum_steps,
                              lr_at(epoch / cfg.epochs, batch_size, cfg), new_shape=shape not in shapes))
        shapes.add(shape)
    return Plan(rows=tuple(rows), val_resolution=cfg.data.val_resolution or rows[-1].resolution,
                val_batch_size=cfg.data.val_batch_size or cfg.optim.batch_size, cfg=cfg)
