"""`fastimagenet lr-find`: an LR range test (Smith, "Cyclical Learning Rates", 2017). Starting from the recipe's
fresh model, train for a few steps while the LR grows exponentially from `min_lr` to `max_lr`, record the smoothed
loss, stop once it blows up, and suggest the LR where the loss falls fastest.

LRs are in `optim.lr` units (per 256 images), so the suggestion goes straight into a recipe. It runs on the
recipe's first stage (resolution, batch size, optimizer, loader) and writes only the plot: no run directory, no
checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError
from fastimagenet.config import Config
from fastimagenet.optim import set_lr
from fastimagenet.plan import build_plan
from fastimagenet.runtime import resolve_runtime, seed_everything
from fastimagenet.train import train_step
from fastimagenet.training_setup import build_training

SMOOTHING = 0.9  # EMA of the loss: a single noisy batch must not end the test or pick the LR
DIVERGE_FACTOR = 4.0  # stop when the smoothed loss exceeds this multiple of its best value
SKIP_START = 0.1  # the first steps move the loss little and noisily; the suggestion ignores them


@dataclass
class LrFindResult:
    lrs: list[float]  # optim.lr (per 256 images) at each step
    losses: list[float]  # smoothed, bias-corrected training loss at each step
    suggested_lr: float  # per 256 images
    batch_size: int
    resolution: int
    stopped_early: bool  # the loss diverged before max_lr


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """The LR of the steepest descent of loss vs log(LR), looked for between the first steps and the lowest loss
    (past the minimum the loss is already on its way up). With too short a curve, a tenth of the LR at the minimum."""
    best = int(np.argmin(losses))
    start = int(len(losses) * SKIP_START)
    if best - start < 3:
        return lrs[best] / 10
    slopes = np.gradient(np.asarray(losses[start : best + 1]), np.log(np.asarray(lrs[start : best + 1])))
    return lrs[start + int(np.argmin(slopes))]


def lr_range_test(cfg: Config, steps: int = 100, min_lr: float = 1e-4, max_lr: float = 10.0) -> LrFindResult:
    if not 0 < min_lr < max_lr:
        raise UserError(f"lr-find: need 0 < --min-lr < --max-lr, got {min_lr} and {max_lr}")
    if steps < 10:
        raise UserError(f"lr-find: --steps must be at least 10 to draw a curve, got {steps}")
    rt = resolve_runtime(cfg)
    seed_everything(cfg.runtime.seed)
    plan = build_plan(cfg)
    first = plan.rows[0]
    run = build_training(cfg, plan, rt, with_val=False)
    run.train_module.train()
    resolution, batch_size, accum = first.resolution, first.batch_size, first.accum_steps

    lrs, losses = [], []
    average, best, stopped_early = 0.0, math.inf, False
    batches = _endless(run.train_loader)
    for step in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (step / (steps - 1))
        set_lr(run.optimizer, lr * batch_size / 256)
        total = 0.0
        for micro in range(accum):
            images, labels = next(batches)
            # train's own step (autocast, GradScaler, clipping): the LR found is the LR of that step
            total += train_step(run, images, labels, accum, update=micro == accum - 1).item() / accum
        average = SMOOTHING * average + (1 - SMOOTHING) * total
        smoothed = average / (1 - SMOOTHING ** (step + 1))
        if not math.isfinite(smoothed):
            stopped_early = True
            break
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > DIVERGE_FACTOR * best:
            stopped_early = True
            break
    return LrFindResult(lrs, losses, suggest_lr(lrs, losses), batch_size, resolution, stopped_early)


def _endless(loader):
    """Batches across as many epochs as the test needs (a small dataset has fewer batches than steps)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError("lr-find: the train split produced no batches (fewer images than one batch?)")
        epoch += 1


def check_plot_path(path) -> Path:
    """Checked before the test runs, so a bad path does not waste it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: the lr-find plot is a PNG; give a path ending in .png")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give the PNG file to write")
    return path


def save_plot(result: LrFindResult, path: Path, title: str) -> None:
    """Loss vs LR on a log axis with the suggestion marked; written to a temporary name and then renamed, so a
    crash never leaves a half-written PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_plot_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses)
    ax.axvline(result.suggested_lr, color="tab:red", linestyle="--",
               label=f"suggested optim.lr={result.suggested_lr:.3g}")
    ax.set_xscale("log")
    # The divergence at the end would squash the useful part of the curve: cap the axis just above the start.
    low, start, high = min(result.losses), result.losses[0], max(result.losses)
    span = max(start - low, 0.1 * abs(start), 1e-3)
    ax.set_ylim(low - 0.05 * span, min(high, start + 0.5 * span) + 0.05 * span)
    ax.set_xlabel("optim.lr (per 256 images)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"{title}: {result.resolution} px, batch {result.batch_size}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
