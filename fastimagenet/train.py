"""The training loop. It never asks which loader backend it has: every backend yields the same
(uint8 channels-last images, int64 labels) on the device, and takes a new resolution and batch size per epoch.

Host-device syncs are deliberate and marked `# sync:`; none happens per step except at log intervals.

Under torchrun every process runs this same loop on its shard of the data (DistributedDataParallel averages the
gradients); metrics are reduced over the ranks, and only rank 0 prints and writes the run directory.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import loaders
from fastimagenet.checkpoint import (CheckpointKeeper, atomic_torch_save, load_checkpoint, remove_partial_writes,
                                     restore_rng_state, training_state)
from fastimagenet.config import Config, save_config, to_dict
from fastimagenet.ema import ModelEma
from fastimagenet.distributed import (DistEnv, all_reduce_sum, average_buffers, env_from_torchrun,
                                      init_process_group, is_main_process, shutdown, wrap_ddp)
from fastimagenet.errors import UserError
from fastimagenet.flops import TrainFlops, mfu, peak_tflops
from fastimagenet.metrics import RunLogger
from fastimagenet.models import build_model, normalize
from fastimagenet.plots import write_run_plot
from fastimagenet.optim import build_optimizer, set_lr
from fastimagenet.runtime import Runtime, compile_forward, resolve_runtime, seed_everything
from fastimagenet.schedules import batch_size_at, lr_at, resolution_at, schedule_table, val_resolution
from loaders.augment import Augment
from loaders.base import LoaderSpec

# Steps at the start of each epoch left out of images/s: they carry compile warm-up and loader start-up.
_TIMING_WARMUP_STEPS = 2


@dataclass
class EpochResult:
    loss: float
    images_per_s: float
    seconds: float


def make_run_dir(cfg: Config) -> Path:
    out = cfg.runtime.out_dir or f"runs/{cfg.model.arch}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_loaders(cfg: Config, rt: Runtime, env: DistEnv = DistEnv()):
    """The train loader decides the classes; the val loader reuses them so labels agree. Batch sizes are global:
    each backend shards the data by rank and gives every rank its share of the batch."""
    common = dict(
        rank=env.rank,
        world_size=env.world_size,
        device=rt.device,
        augment=Augment.from_config(cfg.data),
        options=cfg.loader,
        seed=cfg.runtime.seed,
        strict=cfg.data.strict,
        num_classes=cfg.data.num_classes,
    )
    train = loaders.build_loader(
        cfg.loader.name,
        LoaderSpec(
            path=cfg.data.train,
            train=True,
            resolution=resolution_at(0, cfg),
            batch_size=batch_size_at(0, cfg) // cfg.optim.accum_steps,
            **common,
        ),
    )
    val = loaders.build_loader(
        cfg.loader.name,
        LoaderSpec(
            path=cfg.data.val,
            train=False,
            resolution=val_resolution(cfg),
            batch_size=cfg.data.val_batch_size or cfg.optim.batch_size,
            classes=train.classes,
            **common,
        ),
    )
    return train, val


def distinct_compiled_shapes(cfg: Config) -> int:
    """Train graphs (one per distinct (resolution, batch)) plus the eval graph."""
    return len({(resolution_at(e, cfg), batch_size_at(e, cfg)) for e in range(cfg.epochs)}) + 1


def train_one_epoch(forward, model, loader, optimizer, scaler, cfg: Config, rt: Runtime, epoch: int,
                    batch_size: int, ema: ModelEma | None = None) -> EpochResult:
    model.train()
    steps, accum = len(loader), cfg.optim.accum_steps
    loss_sum = torch.zeros((), device=rt.device)
    images_seen = timed_images = 0
    start = timed_start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, disable=not is_main_process())
    # DDP: accumulation micro-steps skip the gradient all-reduce; only the step that updates the weights syncs.
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for step, (images, labels) in enumerate(loader):
        if step == _TIMING_WARMUP_STEPS:
            rt.synchronize()  # sync: start the throughput clock after warm-up (once per epoch)
            timed_start, timed_images = time.perf_counter(), images_seen
        set_lr(optimizer, lr_at((epoch + step / steps) / cfg.epochs, batch_size, cfg))
        updates = (step + 1) % accum == 0 or step + 1 == steps
        with contextlib.nullcontext() if updates else no_sync():
            with rt.autocast():
                loss = F.cross_entropy(forward(images), labels, label_smoothing=cfg.optim.label_smoothing)
            scaler.scale(loss / accum).backward()
        if updates:
            if cfg.optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
        loss_sum += loss.detach()
        images_seen += labels.shape[0]
        bar.update()
        if (step + 1) % cfg.runtime.log_interval == 0:
            # sync: read the running loss for the progress bar, once per log interval
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.3f}", img_s=f"{images_seen / elapsed:.0f}")
    rt.synchronize()  # sync: end of epoch, for the timing
    end = time.perf_counter()
    bar.close()
    if steps > _TIMING_WARMUP_STEPS + 1:
        images_per_s = (images_seen - timed_images) / (end - timed_start)
    else:
        images_per_s = images_seen / (end - start)
    # Ranks step in lock-step (every step all-reduces), so the sum of their rates is the run's rate.
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(steps), device=rt.device),
                                         torch.tensor(images_per_s, device=rt.device)]))
    loss_total, steps_total, images_per_s = totals.tolist()  # sync: once per epoch
    return EpochResult(loss=loss_total / max(1, steps_total), images_per_s=images_per_s, seconds=end - start)


@torch.no_grad()
def evaluate(forward, model, loader, rt: Runtime, per_rank_batch: int, tta_flip: bool) -> dict:
    """Top-1/top-5 and loss over every sample exactly once, summed over the ranks (each evaluates its own disjoint
    shard). The last partial batch is padded to the full per-rank batch (padding labelled -1 and not counted) so
    eval compiles one shape."""
    model.eval()
    sums = torch.zeros(4, device=rt.device)  # loss, top1, top5, count
    for images, labels in loader:
        missing = per_rank_batch - labels.shape[0]
        if missing > 0:
            images = torch.cat([images, images[:1].expand(missing, *images.shape[1:])]).contiguous(
                memory_format=torch.channels_last)
            labels = torch.cat([labels, labels.new_full((missing,), -1)])
        with rt.autocast():
            logits = forward(images)
            if tta_flip:
                logits = logits + forward(images.flip(3))
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums += torch.stack([
            F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum"),
            hits[:, 0].sum(),
            hits.any(dim=1).sum(),
            (labels >= 0).sum(),
        ]).float()
    loss, top1, top5, count = all_reduce_sum(sums).tolist()  # sync: once per evaluation
    if count == 0:
        raise UserError("the validation split produced no samples")
    return {"val_loss": loss / count, "val_top1": top1 / count, "val_top5": top5 / count, "val_images": int(count)}


def fit(cfg: Config, resume_from: Path | None = None) -> dict:
    """Train per the config; returns the last epoch's metrics record. Under torchrun, each process trains its shard
    of the data with DDP. `resume_from`: a checkpoint (last.pt) to continue from, exactly where it stopped."""
    env = env_from_torchrun()
    rt = resolve_runtime(cfg, env.local_rank)
    if cfg.model.sync_bn and env.world_size > 1 and rt.device.type != "cuda":
        raise UserError("config: model.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
    init_process_group(env, rt.device)
    try:
        return _fit(cfg, env, rt, resume_from)
    finally:
        shutdown()


def _quiet(*args, **kwargs) -> None:
    """`print` of the ranks other than 0."""


def _restore(state: dict, model, optimizer, scaler, ema: ModelEma | None) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"]["module"])
        ema.updates = state["ema"]["updates"]
    restore_rng_state(state["rng"])


def _fit(cfg: Config, env: DistEnv, rt: Runtime, resume_from: Path | None) -> dict:
    say = print if env.is_main else _quiet
    seed_everything(cfg.runtime.seed)
    if cfg.optim.batch_size % cfg.optim.accum_steps or any(
        batch_size_at(e, cfg) % cfg.optim.accum_steps for e in range(cfg.epochs)
    ):
        raise UserError("config: every batch size must be divisible by 'optim.accum_steps'")
    state = load_checkpoint(resume_from) if resume_from is not None else None
    start_epoch = state["epoch"] + 1 if state else 0
    if start_epoch >= cfg.epochs:
        raise UserError(f"{resume_from}: the run already finished its {cfg.epochs} epochs")
    out_dir = make_run_dir(cfg) if env.is_main else None
    if env.is_main:
        save_config(cfg, out_dir / "config.yaml")
        if state:
            remove_partial_writes(out_dir)
    train_loader, val_loader = build_loaders(cfg, rt, env)
    num_classes = cfg.data.num_classes or len(train_loader.classes)

    def make_model():
        return build_model(cfg.model.arch, num_classes, cfg.model.width, cfg.model.zero_init_residual,
                           cfg.model.blurpool)

    model = make_model()
    if cfg.model.sync_bn and env.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Order: device and memory format first, then DDP (its buckets follow the final parameters), then compile.
    memory_format = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
    model = model.to(rt.device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    ema = ModelEma(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    if state:
        _restore(state, model, optimizer, scaler, ema)
    ddp_model = wrap_ddp(model, env, rt.device, cfg.runtime.ddp_bucket_mb, cfg.runtime.ddp_static_graph)
    forward = compile_forward(lambda images: ddp_model(normalize(images)), rt, cfg.runtime.compile_backend,
                              distinct_compiled_shapes(cfg))
    if ema is not None:  # the EMA model gets its own eval graph
        ema_forward = compile_forward(lambda images: ema.module(normalize(images)), rt, cfg.runtime.compile_backend,
                                      distinct_compiled_shapes(cfg))
    flops = TrainFlops(make_model)
    peak = peak_tflops(rt.device, rt.precision, cfg.runtime.peak_tflops)

    say(f"run directory: {out_dir}" + (f" (resuming at epoch {start_epoch})" if state else ""))
    say(f"device {rt.device} x {env.world_size} process(es), precision {rt.precision}, compile {rt.compile}, "
        f"loader {cfg.loader.name}, {len(train_loader.classes)} classes, model {cfg.model.arch}")
    say(schedule_table(cfg))
    keeper = CheckpointKeeper(out_dir, cfg.runtime.keep_best, state.get("best_ranking") if state else None)
    logger = RunLogger(out_dir, start_epoch) if env.is_main else None
    record = {}
    val_batch = (cfg.data.val_batch_size or cfg.optim.batch_size) // env.world_size
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            resolution, batch_size = resolution_at(epoch, cfg), batch_size_at(epoch, cfg)
            train_loader.reconfigure(resolution, batch_size // cfg.optim.accum_steps)
            train_loader.set_epoch(epoch)
            if rt.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(rt.device)
            result = train_one_epoch(forward, ddp_model, train_loader, optimizer, scaler, cfg, rt, epoch,
                                     batch_size, ema)
            average_buffers(model)  # sync: once per epoch, so every rank evaluates the same BN statistics
            val = evaluate(forward, ddp_model, val_loader, rt, val_batch, cfg.runtime.tta_flip)
            if ema is not None:
                ema_val = evaluate(ema_forward, ema.module, val_loader, rt, val_batch, cfg.runtime.tta_flip)
                val.update({f"ema_{key}": value for key, value in ema_val.items() if key != "val_images"})
            skipped = all_reduce_sum(torch.tensor(float(len(train_loader.skipped) + len(val_loader.skipped)),
                                                  device=rt.device))
            flops_per_image = flops.per_image(resolution)
            record = {
                "epoch": epoch,
                "resolution": resolution,
                "batch_size": batch_size,
                "lr": lr_at((epoch + 1) / cfg.epochs, batch_size, cfg),
                "train_loss": result.loss,
                **val,
                "images_per_s": result.images_per_s,
                "epoch_time_s": result.seconds,
                "tflops": flops_per_image * result.images_per_s / 1e12,  # achieved, all devices together
                "skipped_files": int(skipped.item()),  # sync: once per epoch
            }
            utilisation = mfu(flops_per_image, result.images_per_s, peak, env.world_size)
            if utilisation is not None:
                record["mfu"] = utilisation
            if rt.device.type == "cuda":
                record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
            keeper.rank(epoch, val["val_top1"])
            if env.is_main:
                logger.log_epoch(record)
                state = training_state(model, optimizer, scaler, epoch, keeper.best_top1(), to_dict(cfg),
                                       best_ranking=keeper.ranking)
                if ema is not None:
                    state["ema"] = ema.state_dict()
                keeper.save(state, epoch)
    except KeyboardInterrupt:
        if env.is_main:
            # Mid-epoch weights for export; an exact resume continues from last.pt (the last finished epoch).
            state = training_state(model, optimizer, scaler, epoch - 1, keeper.best_top1(), to_dict(cfg),
                                   best_ranking=keeper.ranking, interrupted_in_epoch=epoch)
            atomic_torch_save(state, out_dir / "interrupted.pt")
            say(f"interrupted in epoch {epoch}: weights saved to {out_dir / 'interrupted.pt'}; "
                f"continue with: fastimagenet train --resume {out_dir}")
        raise
    finally:
        if logger is not None:
            logger.close()
    if env.is_main:
        say(f"plots: {write_run_plot(out_dir)}")
    say(f"done: val top-1 {record['val_top1']:.2%} (best {keeper.best_top1():.2%}); run in {out_dir}")
    return record
