"""Checkpoints: written atomically each epoch (a crash mid-write leaves the previous file, never a truncated one),
the best-k kept by val top-1, and read back for an exact resume.

Files in a run directory:
  last.pt              end of the last finished epoch: what `train --resume RUN_DIR` continues from
  best.pt              the best epoch so far (a hard link to one of the best-epochNNN.pt files)
  best-epochNNN.pt     the `runtime.keep_best` best epochs
  interrupted.pt       the weights at the moment of a Ctrl-C, mid-epoch (for export; resume uses last.pt)
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from fastimagenet.atomic import atomic_output
from fastimagenet.config import Config, apply_overrides, from_saved, validate
from fastimagenet.errors import UserError


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def remove_partial_writes(run_dir: Path) -> int:
    """Temp files left by a process killed mid-write (the files they were to replace are intact)."""
    stale = list(Path(run_dir).glob(".*.tmp*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _atomic_link(source: Path, target: Path) -> None:
    """`target` becomes another name of `source`'s file (no copy); the swap is atomic."""
    with atomic_output(target) as tmp:
        os.link(source, tmp)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def training_state(model, optimizer, scaler, epoch: int, best_top1: float, config: dict, **extra) -> dict:
    """Everything an exact resume needs. The LR and the resolution/batch schedules are pure functions of the
    epoch, so `epoch` is the whole schedule position; `model` is the unwrapped module (no DDP/compile prefixes)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,  # last finished epoch
        "best_top1": best_top1,
        "config": config,
        "rng": rng_state(),
        **extra,
    }


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint written by this trainer, or a UserError that names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        # weights_only=False: our own files hold RNG states (numpy arrays, Python tuples) next to the tensors.
        state = torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise UserError(f"{path}: not a fastimagenet checkpoint (no 'model'/'epoch' entries)")
    return state


def resume_config(run_dir: Path, overrides: list[str]) -> tuple[Config, Path]:
    """The config a run saved (plus `key=value` overrides, e.g. runtime.device) and the checkpoint to continue
    from. The run continues in its own directory."""
    run_dir = Path(run_dir)
    config_path, last = run_dir / "config.yaml", run_dir / "last.pt"
    if not config_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    if not last.is_file():
        raise UserError(f"{run_dir}: no finished epoch to resume from (no last.pt)")
    cfg = from_saved(config_path)
    apply_overrides(cfg, overrides)
    cfg.runtime.out_dir = str(run_dir)
    validate(cfg)
    return cfg, last


class CheckpointKeeper:
    """Writes last.pt every epoch and keeps the `keep_best` best epochs by val top-1 (ties keep the earlier).
    Every rank ranks the epochs; only rank 0 has a run directory and saves."""

    def __init__(self, run_dir: Path | None, keep_best: int, ranking: list[tuple[float, int]] | None = None):
        self.run_dir, self.keep_best = run_dir, keep_best
        self.ranking = [tuple(r) for r in ranking or []]  # (top1, epoch), best first

    def best_top1(self) -> float:
        return self.ranking[0][0] if self.ranking else -1.0

    def rank(self, epoch: int, top1: float) -> None:
        ranking = [r for r in self.ranking if r[1] != epoch] + [(top1, epoch)]
        self.ranking = sorted(ranking, key=lambda r: (-r[0], r[1]))[: self.keep_best]

    def save(self, state: dict, epoch: int) -> None:
        """Call after `rank(epoch, ...)`, with a state that carries the new ranking."""
        atomic_torch_save(state, self.run_dir / "last.pt")
        self.link_best(epoch)

    def link_best(self, epoch: int) -> None:
        """Give last.pt (the checkpoint of `epoch`) its best-epoch names and drop the epochs no longer ranked.
        Idempotent: a resume calls it again for the checkpoint it continues from, finishing links that a kill
        between writing last.pt and linking it left undone."""
        last = self.run_dir / "last.pt"
        kept = {e for _, e in self.ranking}
        if epoch not in kept:
            return
        _atomic_link(last, self.run_dir / f"best-epoch{epoch:03d}.pt")
        if self.ranking[0][1] == epoch:
            _atomic_link(last, self.run_dir / "best.pt")
        for path in self.run_dir.glob("best-epoch*.pt"):
            if int(path.stem.removeprefix("best-epoch")) not in kept:
                path.unlink(missing_ok=True)
