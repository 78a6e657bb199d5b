"""The training loop. It never asks which loader backend it has: every backend yields the same
(uint8 channels-last images, int64 labels) on the device, and takes a new resolution and batch size per epoch.

Host-device syncs are deliberate and marked `# sync:`; none happens per step except at log intervals.

Under torchrun every process runs this same loop on its shard of the data (DistributedDataParallel averages the
gradients); metrics are reduced over the ranks, and only rank 0 prints and writes the run directory.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Callable
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastimagenet.checkpoint import CheckpointKeeper, load_checkpoint, remove_partial_writes
from fastimagenet.common.errors import Preempted, UserError
from fastimagenet.config import Config, save_config
from fastimagenet.dataset_tools import object_store
from fastimagenet.distributed import (DistEnv, all_reduce_sum, average_buffers, env_from_torchrun,
                                      init_process_group, is_main_process, shutdown)
from fastimagenet.evaluation import evaluate
from fastimagenet.flops import mfu, peak_tflops
from fastimagenet.metrics import EpochResult, RunLogger
from fastimagenet.optim import set_lr
from fastimagenet.plan import EpochPlan, build_plan
from fastimagenet.plots import write_run_plot
from fastimagenet.preemption import StopSignals
from fastimagenet.run_dir import check_out_dir, discard_run_dir, make_run_dir
from fastimagenet.runtime import Runtime, resolve_runtime, seed_everything, sync_bn_compile_warning
from fastimagenet.training_setup import Training, build_training

# Steps at the start of each epoch left out of images/s: they carry compile warm-up and loader start-up.
_TIMING_WARMUP_STEPS = 2


def run_dir_of(cfg: Config) -> Path:
    """runtime.out_dir, or a new runs/<arch>-<time> (made by rank 0 when training starts: fastimagenet/run_dir.py)."""
    return Path(cfg.runtime.out_dir or f"runs/{cfg.model.arch}-{datetime.now():%Y%m%d-%H%M%S}")


def train_step(run: Training, images: torch.Tensor, labels: torch.Tensor, accum_steps: int, update: bool):
    """One forward/backward of a micro-batch; with `update`, the optimizer step (and EMA update) that ends an
    accumulation. No host-device sync: returns the loss as a device tensor."""
    cfg = run.cfg
    run.rt.step_begin()
    # DDP: accumulation micro-steps skip the gradient all-reduce; only the step that updates the weights syncs.
    no_sync = getattr(run.train_module, "no_sync", contextlib.nullcontext)
    with contextlib.nullcontext() if update else no_sync():
        with run.rt.autocast():
            loss = F.cross_entropy(run.forward(images), labels, label_smoothing=cfg.optim.label_smoothing)
        run.scaler.scale(loss / accum_steps).backward()
    if update:
        if cfg.optim.grad_clip > 0:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=not run.keeps_gradients)
        if run.ema is not None:
            run.ema.update()
    return loss.detach()


def accumulation_group(step: int, steps: int, accum_steps: int) -> int:
    """Micro-batches in the optimizer step that `step` belongs to: `accum_steps`, except for a last group cut short
    by the end of the epoch, which is averaged over the micro-batches it has (a smaller big batch, not a
    down-weighted one)."""
    return min(accum_steps, steps - step // accum_steps * accum_steps)


@dataclass(frozen=True)
class Position:
    """Where training stands: `epoch`, its first `step` steps done and their training loss summed (`loss_sum`).
    Step 0 is an epoch's start; a checkpoint written inside an epoch saves its position as a dict (`as_dict`)."""

    epoch: int
    step: int = 0
    loss_sum: float = 0.0

    @classmethod
    def of_checkpoint(cls, state: dict | None) -> "Position":
        """Where a run continues: inside the epoch its checkpoint stopped in, else at the start of the epoch after
        the last finished one (epoch 0 without a checkpoint)."""
        if state is None:
            return cls(0)
        if "position" in state:
            return cls(**state["position"])
        return cls(state["epoch"] + 1)

    def as_dict(self) -> dict:
        return asdict(self)


class StopAt(Exception):
    """Raised by train_one_epoch when the ranks agreed to stop; carries where."""

    def __init__(self, position: Position):
        super().__init__(position)
        self.position = position


def train_one_epoch(run: Training, row: EpochPlan, stop: StopSignals, position: Position | None = None,
                    save_position: Callable[[Position], None] | None = None) -> EpochResult:
    """One epoch, or what is left of it from `position` (a resumed epoch starts at the step it stopped at, with the
    loss summed so far; None: the epoch's start). Every update step is a point where the run can stop (StopAt) or
    `save_position` may write a resumable checkpoint (every runtime.checkpoint_every_min)."""
    rt, loader, cfg = run.rt, run.train_loader, run.cfg.runtime
    run.train_module.train()
    position = position or Position(row.epoch)
    steps, first = len(loader), position.step
    loss_sum = torch.tensor(position.loss_sum, device=rt.device)
    images_seen = timed_images = 0
    start = timed_start = last_save = time.perf_counter()
    distributed = run.env.world_size > 1
    bar = tqdm(total=steps, initial=first, desc=f"epoch {row.epoch}", leave=False, dynamic_ncols=True,
               disable=not is_main_process())
    for step, (images, labels) in enumerate(loader, start=first):
        if step == first + _TIMING_WARMUP_STEPS:
            rt.synchronize()  # sync: start the throughput clock after warm-up (once per epoch)
            timed_start, timed_images = time.perf_counter(), images_seen
        set_lr(run.optimizer, run.plan.lr(row.epoch, step, steps) * run.lr_scale)
        group = accumulation_group(step, steps, row.accum_steps)
        update = (step + 1) % row.accum_steps == 0 or step + 1 == steps
        loss_sum += train_step(run, images, labels, group, update)
        images_seen += labels.shape[0]
        bar.update()
        at_log = (step + 1) % cfg.log_interval == 0
        if at_log:
            # sync: read the running loss for the progress bar, once per log interval
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.3f}", img_s=f"{images_seen / elapsed:.0f}")
        if update and step + 1 < steps:
            # Under DDP the ranks agree at log intervals (a collective); alone, a stop is seen at the next step.
            if (at_log or not distributed) and stop.agreed(rt.device, distributed):
                bar.close()
                raise StopAt(Position(row.epoch, step + 1, loss_sum.item()))  # sync: once, when stopping
            if save_position and cfg.checkpoint_every_min and time.perf_counter() - last_save >= \
                    cfg.checkpoint_every_min * 60:
                save_position(Position(row.epoch, step + 1, loss_sum.item()))  # sync: once per checkpoint
                last_save = time.perf_counter()
    rt.synchronize()  # sync: end of epoch, for the timing
    end = time.perf_counter()
    bar.close()
    if steps > _TIMING_WARMUP_STEPS + 1:
        images_per_s = (images_seen - timed_images) / (end - timed_start)
    else:
        images_per_s = images_seen / (end - start)
    # Ranks step in lock-step (every step all-reduces), so the sum of their rates is the run's rate.
    # A resumed epoch starts every rank's loss sum from rank 0's saved one: exact alone, an estimate under DDP.
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(steps), device=rt.device),
                                         torch.tensor(images_per_s, device=rt.device)]))
    loss_total, steps_total, images_per_s = totals.tolist()  # sync: once per epoch
    return EpochResult(loss=loss_total / max(1, steps_total), images_per_s=images_per_s, seconds=end - start)


def average_statistics(run: Training) -> None:
    """Average the BatchNorm statistics of the model and of the EMA (which follows each rank's own) over the ranks,
    so every rank evaluates, and rank 0 saves, the same model. At every epoch's end, validated or not: neither the
    training nor last.pt depends on runtime.eval_every. (sync: once per epoch)"""
    average_buffers(run.model)
    if run.ema is not None:
        average_buffers(run.ema.module)


def validates(epoch: int, epochs: int, eval_every: int) -> bool:
    """runtime.eval_every: every Nth epoch and the last one. By epoch index, so a resumed run validates the same
    epochs as an uninterrupted one."""
    return (epoch + 1) % eval_every == 0 or epoch + 1 == epochs


def validate_epoch(run: Training) -> dict:
    """The epoch's validation figures: the model's, and the EMA model's under `ema_` names."""
    per_rank_batch = run.plan.val_batch_size // run.env.world_size
    val = evaluate(run.forward, run.train_module, run.val_loader, run.rt, per_rank_batch, run.cfg.runtime.tta_flip)
    if run.ema is not None:
        ema_val = evaluate(run.ema_forward, run.ema.module, run.val_loader, run.rt, per_rank_batch,
                           run.cfg.runtime.tta_flip)
        val.update({f"ema_{key}": value for key, value in ema_val.items() if key != "val_images"})
    return val


def fit(cfg: Config, resume_from: Path | None = None, overwrite: bool = False) -> dict:
    """Train per the config; returns the last epoch's metrics record. Under torchrun, each process trains its shard
    of the data with DDP. `resume_from`: a checkpoint (last.pt) to continue from, exactly where it stopped.
    `overwrite`: a runtime.out_dir holding another run is cleared first (else that is an error)."""
    env = env_from_torchrun()
    rt = resolve_runtime(cfg, env.local_rank)
    if cfg.model.sync_bn and env.world_size > 1 and rt.device.type != "cuda":
        raise UserError("config: model.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
    warning = sync_bn_compile_warning(cfg.model.sync_bn and env.world_size > 1, rt.compile)
    if warning and env.is_main:
        print(warning)
    init_process_group(env, rt.device)
    try:
        return _fit(cfg, env, rt, resume_from, overwrite)
    finally:
        shutdown()


def _quiet(*args, **kwargs) -> None:
    """`print` of the ranks other than 0."""


def _open_run_dir(cfg: Config, env: DistEnv, rt: Runtime, resuming: bool, overwrite: bool) -> tuple[Path, bool]:
    """Rank 0's run directory, made only now that the data is found and the model built (and removed again if the
    first epoch fails), so a run that stops on a setup mistake leaves nothing behind. Returns it and whether it is
    new. The config is saved with what the `auto` settings became here."""
    out_dir = run_dir_of(cfg)
    new_dir = make_run_dir(out_dir, overwrite and not resuming)
    try:
        save_config(cfg, out_dir / "config.yaml", resolved={
            "device": str(rt.device), "precision": rt.precision, "compile": rt.compile,
            "processes": env.world_size, "torch": str(torch.__version__)})
    except Exception:
        if not resuming:
            discard_run_dir(out_dir, new_dir)
        raise
    if resuming:
        remove_partial_writes(out_dir)
    return out_dir, new_dir


def _fit(cfg: Config, env: DistEnv, rt: Runtime, resume_from: Path | None, overwrite: bool = False) -> dict:
    say = print if env.is_main else _quiet
    check_out_dir(cfg.runtime.out_dir, resuming=resume_from is not None, overwrite=overwrite)
    seed_everything(cfg.runtime.seed)
    plan = build_plan(cfg)
    state = load_checkpoint(resume_from) if resume_from is not None else None
    start = Position.of_checkpoint(state)
    if start.epoch >= plan.epochs:
        raise UserError(f"{resume_from}: the run already finished its {plan.epochs} epochs")
    run = build_training(cfg, plan, rt, env, state)
    out_dir, new_dir = _open_run_dir(cfg, env, rt, resuming=state is not None, overwrite=overwrite) \
        if env.is_main else (None, False)
    keeper = CheckpointKeeper(out_dir, cfg.runtime.keep_best, state.get("best_ranking") if state else None,
                              state.get("best_ema") if state else None)
    del state  # restored into the model: no second copy of the weights for the whole run
    if start.epoch and env.is_main and not start.step:  # resumed at an epoch's end: mend its best-k links
        keeper.link_best(start.epoch - 1)
    say(_header(run, out_dir, start if resume_from is not None else None))
    logger = RunLogger(out_dir, start.epoch) if env.is_main else None
    record = {}
    with StopSignals(_stop_signal_names(cfg), cfg.runtime.preempt_grace_s) as stop:
        try:
            for epoch in range(start.epoch, plan.epochs):
                record = run_epoch(run, start if epoch == start.epoch else Position(epoch), stop, keeper, logger)
                # asked during validation (or at the last step): last.pt is this epoch's end
                if epoch + 1 < plan.epochs and stop.agreed(rt.device, env.world_size > 1):
                    if env.is_main:
                        keeper.mark_stopped()
                    say(f"stopped after epoch {epoch}; continue with: fastimagenet train --resume {out_dir}")
                    raise Preempted(stop.signum)
        except StopAt as stopped:
            at = stopped.position
            _save_inside(run, keeper, at, stopped=True)
            say(f"stopped in epoch {at.epoch} at step {at.step}: checkpoint {out_dir / 'last.pt'} (also "
                f"interrupted.pt); continue with: fastimagenet train --resume {out_dir}")
            raise Preempted(stop.signum) from None
        except Exception:
            if env.is_main and resume_from is None and not record:  # failed before its first epoch ended
                logger.close()
                logger = None
                discard_run_dir(out_dir, new_dir)
            raise
        finally:
            if logger is not None:
                logger.close()
    if env.is_main:
        say(f"plots: {write_run_plot(out_dir)}")
    say(f"done: val top-1 {record['val_top1']:.2%} (best {keeper.best_top1():.2%}); run in {out_dir}")
    return record


def _header(run: Training, out_dir: Path | None, resumed_at: Position | None) -> str:
    """What a run prints before its first epoch: where it writes (and, resumed, where it goes on), what it runs
    on, and its plan."""
    cfg, rt = run.cfg, run.rt
    where = f"run directory: {out_dir}"
    if resumed_at is not None:
        where += f" (resuming at epoch {resumed_at.epoch}" + (f", step {resumed_at.step})" if resumed_at.step else ")")
    return "\n".join([
        where,
        f"device {rt.device} x {run.env.world_size} process(es), precision {rt.precision}, compile {rt.compile}, "
        f"loader {cfg.loader.name}, {len(run.train_loader.classes)} classes, model {cfg.model.arch}",
        run.plan.table()])


def _stop_signal_names(cfg: Config) -> list[str]:
    """SIGTERM and SIGINT always, and runtime.preempt_signal when set."""
    return ["SIGTERM", "SIGINT"] + [cfg.runtime.preempt_signal] * bool(cfg.runtime.preempt_signal)


def run_epoch(run: Training, at: Position, stop: StopSignals, keeper: CheckpointKeeper,
              logger: RunLogger | None) -> dict:
    """Epoch `at.epoch`, from `at` on: trained, its BatchNorm statistics averaged, validated when due, ranked for
    best-k, logged and saved as last.pt (by rank 0, the one with a `logger`). Returns its metrics record."""
    rt, row = run.rt, run.plan.rows[at.epoch]
    # The epoch's resolution and batch size reach the decoder: batches come at this size from the start.
    run.train_loader.reconfigure(row.resolution, row.micro_batch)
    run.train_loader.set_epoch(at.epoch, at.step)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    result = train_one_epoch(run, row, stop, at, lambda here: _save_inside(run, keeper, here, stopped=False))
    average_statistics(run)
    # An epoch left unvalidated logs no val_* figures and is not ranked for best.pt; last.pt is still saved
    val = validate_epoch(run) if validates(at.epoch, run.plan.epochs, run.cfg.runtime.eval_every) else {}
    record = epoch_record(run, row, result, val)
    if val:
        keeper.rank(at.epoch, val["val_top1"], val.get("ema_val_top1"))
    plateau = run.plateau
    # Every rank observes (each keeps the LR scale); rank 0 says so.
    if val and plateau is not None and plateau.observe(val["val_top1"]) and run.env.is_main:
        print(f"val top-1 flat for {plateau.patience} validated epochs: LR x{plateau.factor:g} from "
              f"epoch {at.epoch + 1} (now x{plateau.scale:g} of the plan's)")
    if logger is not None:
        logger.log_epoch(record)
        keeper.save(_checkpoint(run, keeper, at.epoch), at.epoch)
    return record


def epoch_record(run: Training, row: EpochPlan, train: EpochResult, val: dict) -> dict:
    """One line of metrics.jsonl: the epoch's plan, its training and validation figures (none, `val` empty, for an
    epoch that runtime.eval_every leaves unvalidated), its speed, and its GPU memory peak. Every rank calls it: the
    files skipped are summed over the ranks."""
    rt = run.rt
    skipped = all_reduce_sum(torch.tensor(float(len(run.train_loader.skipped) + len(run.val_loader.skipped)),
                                          device=rt.device))
    flops_per_image = run.flops.per_image(row.resolution)
    record = {
        "epoch": row.epoch,
        "resolution": row.resolution,
        "batch_size": row.batch_size,
        "lr": run.plan.lr_end(row.epoch) * run.lr_scale,
        "train_loss": train.loss,
        **val,
        "images_per_s": train.images_per_s,
        "epoch_time_s": train.seconds,
        "tflops": flops_per_image * train.images_per_s / 1e12,  # achieved, all devices together
        "skipped_files": int(skipped.item()),  # sync: once per epoch
        # this rank's object-store errors retried in this run so far
        "fetch_retries": object_store.retry_count() - run.retries_before,
    }
    peak = peak_tflops(rt.device, rt.precision, run.cfg.runtime.peak_tflops)
    utilisation = mfu(flops_per_image, train.images_per_s, peak, run.env.world_size)
    if utilisation is not None:
        record["mfu"] = utilisation
    if rt.device.type == "cuda":
        record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
    return record


def _checkpoint(run: Training, keeper: CheckpointKeeper, epoch: int, **extra) -> dict:
    """The run's checkpoint as of the end of `epoch`, with the keeper's best-k and best-EMA rankings."""
    return run.state(epoch, keeper.best_top1(), best_ranking=keeper.ranking, best_ema=keeper.ema_best, **extra)


def _save_inside(run: Training, keeper: CheckpointKeeper, at: Position, stopped: bool) -> None:
    """Rank 0 writes the position `at`, inside its epoch, as last.pt (`stopped`: the run stops there)."""
    if run.env.is_main:
        keeper.save_position(_checkpoint(run, keeper, at.epoch - 1, position=at.as_dict()), stopped)
