"""Checkpoints written atomically: a crash mid-write leaves the previous file, never a truncated one."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def training_state(model, optimizer, scaler, epoch: int, best_top1: float, config: dict) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,  # last finished epoch
        "best_top1": best_top1,
        "config": config,
        "torch_rng": torch.get_rng_state(),
    }
