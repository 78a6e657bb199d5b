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
        sgd = torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused)
        zero_momentum_buffers(sgd)
        return sgd
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, fused=fused)


def zero_momentum_buffers(sgd: torch.optim.SGD) -> None:
    """SGD's momentum buffers, made as zeros now. torch makes them on the first step with `empty_like` and lets
    that step fill them; the fused kernel returns early when a GradScaler found an overflow (fp16's first step
    often does: its scale starts at 2^16), so a skipped first step would leave uninitialised memory as momentum.
    Zeros give the first real step the same result (0 * momentum + grad), skipped or not."""
    if not sgd.defaults["momentum"]:
        return
    for group in sgd.param_groups:
        for param in group["params"]:
            sgd.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
