"""Everything a run trains with, built once from the config and the plan: loaders, model, DDP wrapper, compiled
forward, optimizer, gradient scaler and EMA. `train` and `lr-find` both start here, so they train the same thing;
`eval` and `export` build their model (and `eval` its loader) here too, so they load a run into what it trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fastimagenet import loaders
from fastimagenet.checkpoint import restore_rng_state, training_state
from fastimagenet.config import Config, to_dict
from fastimagenet.dataset_tools import object_store
from fastimagenet.distributed import DistEnv, keeps_gradients, wrap_ddp
from fastimagenet.ema import ModelEma
from fastimagenet.flops import TrainFlops
from fastimagenet.loaders.base import Loader, LoaderSpec
from fastimagenet.models import Normalized, build_model
from fastimagenet.optim import build_optimizer
from fastimagenet.plan import Plan
from fastimagenet.plateau import Plateau, plateau_of
from fastimagenet.runtime import Runtime, compile_module


@dataclass
class Training:
    cfg: Config
    plan: Plan
    rt: Runtime
    env: DistEnv
    model: nn.Module  # the bare network: what checkpoints and exports hold, and whose BN statistics are averaged
    train_module: nn.Module  # what trains: normalisation + model, inside DDP under torchrun (its no_sync lives here)
    forward: Callable  # train_module, compiled when runtime.compile is on
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    ema_forward: Callable | None  # the EMA model's own (compiled) forward, for its evaluation
    train_loader: Loader
    val_loader: Loader | None
    flops: TrainFlops
    keeps_gradients: bool  # zero gradients in place, never drop them (DDP's bucket views: distributed.py)
    plateau: Plateau | None  # schedule.lr=plateau: the validation-driven LR scale
    retries_before: int  # object-store retries this process made before the run (object_store.retry_count)

    @property
    def lr_scale(self) -> float:
        """What the plan's LR is multiplied by: the plateau's drops so far (1 for every other schedule)."""
        return self.plateau.scale if self.plateau else 1.0

    def state(self, epoch: int, best_top1: float, **extra) -> dict:
        """A checkpoint of the run as of the end of `epoch`."""
        state = training_state(self.model, self.optimizer, self.scaler, epoch, best_top1, to_dict(self.cfg),
                               classes=self.train_loader.classes, **extra)
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        return state


def build_loaders(cfg: Config, plan: Plan, rt: Runtime, env: DistEnv = DistEnv(),
                  with_val: bool = True) -> tuple[Loader, Loader | None]:
    """The train loader decides the classes; the val loader reuses them so labels agree. Batch sizes are global:
    each backend shards the data by rank and gives every rank its share of the batch."""
    first = plan.rows[0]
    train = _build_loader(cfg, rt, env, path=cfg.data.train, train=True, resolution=first.resolution,
                          batch_size=first.micro_batch, num_classes=cfg.data.num_classes)
    if not with_val:
        return train, None
    return train, build_val_loader(cfg, plan, rt, env, train.classes, cfg.data.num_classes)


def build_val_loader(cfg: Config, plan: Plan, rt: Runtime, env: DistEnv, classes: list[str] | None,
                     num_classes: int) -> Loader:
    """data.val at the plan's eval resolution and batch, labelled as `classes` (None: the split's own)."""
    return _build_loader(cfg, rt, env, path=cfg.data.val, train=False, resolution=plan.val_resolution,
                         batch_size=plan.val_batch_size, classes=classes, num_classes=num_classes)


def _build_loader(cfg: Config, rt: Runtime, env: DistEnv, **split) -> Loader:
    """The configured backend on one split: what is read and how (`split`), on this rank's device and shard."""
    return loaders.build_loader(cfg.loader.name, LoaderSpec(
        device=rt.device, augment=cfg.data, options=cfg.loader, seed=cfg.runtime.seed, strict=cfg.data.strict,
        rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, **split))


def model_of(cfg: Config, num_classes: int) -> nn.Module:
    """The configured network with fresh weights: what `train` trains, and what `eval` and `export` load a run's
    weights into."""
    return build_model(cfg.model.arch, num_classes, cfg.model.width, cfg.model.zero_init_residual,
                       cfg.model.blurpool)


def to_device(model: nn.Module, cfg: Config, rt: Runtime) -> nn.Module:
    """`model` on the run's device, in the memory format runtime.channels_last asks for."""
    memory_format = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
    return model.to(rt.device, memory_format=memory_format)


def build_training(cfg: Config, plan: Plan, rt: Runtime, env: DistEnv = DistEnv(), state: dict | None = None,
                   with_val: bool = True) -> Training:
    """`state`: a checkpoint to continue from (weights, optimizer, scaler, EMA and RNG are restored from it)."""
    retries_before = object_store.retry_count()
    train_loader, val_loader = build_loaders(cfg, plan, rt, env, with_val)
    num_classes = cfg.data.num_classes or len(train_loader.classes)

    def make_model():
        return model_of(cfg, num_classes)

    model = make_model()
    if cfg.model.sync_bn and env.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Order: device and memory format first, then DDP (its buckets follow the final parameters), then compile.
    model = to_device(model, cfg, rt)
    optimizer = build_optimizer(model, cfg.optim, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    ema = ModelEma(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    plateau = plateau_of(cfg.schedule)
    if state is not None:  # before DDP, which starts every rank from rank 0's weights
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if plateau is not None and "plateau" in state:
            plateau.load_state_dict(state["plateau"])
        restore_rng_state(state["rng"])
    train_module = wrap_ddp(Normalized(model).to(rt.device), env, rt.device, cfg.runtime.ddp_bucket_mb,
                            cfg.runtime.ddp_static_graph)
    forward = compile_module(train_module, rt, cfg.runtime.compile_backend, plan.compiled_shapes)
    ema_forward = None
    if ema is not None:  # the EMA model gets its own eval graph
        ema_forward = compile_module(Normalized(ema.module).to(rt.device), rt, cfg.runtime.compile_backend,
                                     plan.compiled_shapes)
    return Training(cfg=cfg, plan=plan, rt=rt, env=env, model=model, train_module=train_module, forward=forward,
                    optimizer=optimizer, scaler=scaler, ema=ema, ema_forward=ema_forward,
                    train_loader=train_loader, val_loader=val_loader, flops=TrainFlops(make_model),
                    keeps_gradients=keeps_gradients(train_module), plateau=plateau, retries_before=retries_before)
