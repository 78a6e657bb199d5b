"""Optimizer construction. Weight decay is split by module type: never on norm layers or biases."""

from __future__ import annotations

import torch
from torch import nn

from fastimagenet.config import OptimConfig

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, _NORM_TYPES) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    # The LR is set every step by the schedule; 0 here is only a placeholder.
    # Fused (one kernel for all parameters) on CUDA. It also keeps an fp16 step off the host: with a GradScaler, the
    # non-fused step reads found_inf on the host every step, the fused one takes it as a device tensor.
    fused = device.type == "cuda"
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused)
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
