"""The training loop. It never asks which loader backend it has: every backend yields the same
(uint8 channels-last images, int64 labels) on the device, and takes a new resolution and batch size per epoch.

Host-device syncs are deliberate and marked `# sync:`; none happens per step except at log intervals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import loaders
from fastimagenet.checkpoint import atomic_torch_save, training_state
from fastimagenet.config import Config, save_config, to_dict
from fastimagenet.ema import ModelEma
from fastimagenet.errors import UserError
from fastimagenet.metrics import RunLogger
from fastimagenet.models import build_model, normalize
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


def build_loaders(cfg: Config, rt: Runtime):
    """The train loader decides the classes; the val loader reuses them so labels agree."""
    common = dict(
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
    bar = tqdm(total=steps, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
    for step, (images, labels) in enumerate(loader):
        if step == _TIMING_WARMUP_STEPS:
            rt.synchronize()  # sync: start the throughput clock after warm-up (once per epoch)
            timed_start, timed_images = time.perf_counter(), images_seen
        set_lr(optimizer, lr_at((epoch + step / steps) / cfg.epochs, batch_size, cfg))
        with rt.autocast():
            loss = F.cross_entropy(forward(images), labels, label_smoothing=cfg.optim.label_smoothing)
        scaler.scale(loss / accum).backward()
        if (step + 1) % accum == 0 or step + 1 == steps:
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
    return EpochResult(loss=loss_sum.item() / max(1, steps), images_per_s=images_per_s, seconds=end - start)


@torch.no_grad()
def evaluate(forward, model, loader, rt: Runtime, per_rank_batch: int, tta_flip: bool) -> dict:
    """Top-1/top-5 and loss over every sample exactly once. The last partial batch is padded to the full batch
    (padding labelled -1 and not counted) so eval compiles one shape."""
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
    loss, top1, top5, count = sums.tolist()  # sync: once per evaluation
    if count == 0:
        raise UserError("the validation split produced no samples")
    return {"val_loss": loss / count, "val_top1": top1 / count, "val_top5": top5 / count}


def fit(cfg: Config) -> dict:
    """Train per the config; returns the last epoch's metrics record."""
    rt = resolve_runtime(cfg)
    seed_everything(cfg.runtime.seed)
    if cfg.optim.batch_size % cfg.optim.accum_steps or any(
        batch_size_at(e, cfg) % cfg.optim.accum_steps for e in range(cfg.epochs)
    ):
        raise UserError("config: every batch size must be divisible by 'optim.accum_steps'")
    out_dir = make_run_dir(cfg)
    save_config(cfg, out_dir / "config.yaml")
    train_loader, val_loader = build_loaders(cfg, rt)
    num_classes = cfg.data.num_classes or len(train_loader.classes)
    model = build_model(cfg.model.arch, num_classes, cfg.model.width, cfg.model.zero_init_residual,
                        cfg.model.blurpool)
    memory_format = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
    model = model.to(rt.device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    forward = compile_forward(lambda images: model(normalize(images)), rt, cfg.runtime.compile_backend,
                              distinct_compiled_shapes(cfg))
    ema = ModelEma(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    if ema is not None:  # the EMA model gets its own eval graph
        ema_forward = compile_forward(lambda images: ema.module(normalize(images)), rt, cfg.runtime.compile_backend,
                                      distinct_compiled_shapes(cfg))

    print(f"run directory: {out_dir}")
    print(f"device {rt.device}, precision {rt.precision}, compile {rt.compile}, loader {cfg.loader.name}, "
          f"{len(train_loader.classes)} classes, model {cfg.model.arch}")
    print(schedule_table(cfg))
    logger = RunLogger(out_dir)
    best_top1, record = -1.0, {}
    val_batch = cfg.data.val_batch_size or cfg.optim.batch_size
    try:
        for epoch in range(cfg.epochs):
            resolution, batch_size = resolution_at(epoch, cfg), batch_size_at(epoch, cfg)
            train_loader.reconfigure(resolution, batch_size // cfg.optim.accum_steps)
            train_loader.set_epoch(epoch)
            result = train_one_epoch(forward, model, train_loader, optimizer, scaler, cfg, rt, epoch, batch_size,
                                     ema)
            val = evaluate(forward, model, val_loader, rt, val_batch, cfg.runtime.tta_flip)
            if ema is not None:
                ema_val = evaluate(ema_forward, ema.module, val_loader, rt, val_batch, cfg.runtime.tta_flip)
                val.update({f"ema_{key}": value for key, value in ema_val.items()})
            record = {
                "epoch": epoch,
                "resolution": resolution,
                "batch_size": batch_size,
                "lr": lr_at((epoch + 1) / cfg.epochs, batch_size, cfg),
                "train_loss": result.loss,
                **val,
                "images_per_s": result.images_per_s,
                "epoch_time_s": result.seconds,
                "skipped_files": len(train_loader.skipped) + len(val_loader.skipped),
            }
            logger.log_epoch(record)
            state = training_state(model, optimizer, scaler, epoch, max(best_top1, val["val_top1"]), to_dict(cfg))
            if ema is not None:
                state["ema"] = ema.state_dict()
            atomic_torch_save(state, out_dir / "last.pt")
            if val["val_top1"] > best_top1:
                best_top1 = val["val_top1"]
                atomic_torch_save(state, out_dir / "best.pt")
    finally:
        logger.close()
    print(f"done: val top-1 {record['val_top1']:.2%} (best {best_top1:.2%}); run in {out_dir}")
    return record
