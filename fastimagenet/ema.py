"""Exponential moving average (EMA) of a model's weights, kept as a second model that is evaluated each epoch.

Averaging the weights of the last few thousand steps smooths out SGD noise, which tends to help most when the
learning rate does not decay to zero (EMA of weights is the classic companion of long or constant-LR runs).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """`module` is a frozen copy of the model whose floating-point parameters and buffers (BatchNorm running
    statistics included) follow the training model as  ema <- decay * ema + (1 - decay) * current."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        # Tensors are paired once: the optimizer updates parameters in place, so these views stay current.
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._float = [(e, m) for e, m in pairs if e.is_floating_point()]
        self._exact = [(e, m) for e, m in pairs if not e.is_floating_point()]  # e.g. BN's num_batches_tracked

    def current_decay(self) -> float:
        """Warm-up: early on the average would be dominated by the random initialisation, so the effective
        decay starts near 0 and approaches `decay` over the first ~10/(1-decay) updates."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimizer step. Two multi-tensor kernels (a lerp, a copy), not one per tensor; no
        host-device sync."""
        weight = 1 - self.current_decay()
        self.updates += 1
        if self._float:
            ema, current = zip(*self._float)
            torch._foreach_lerp_(list(ema), list(current), weight)
        if self._exact:
            ema, current = zip(*self._exact)
            torch._foreach_copy_(list(ema), list(current))

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Weights and warm-up position from `state_dict()`; the decay stays the configured one."""
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
