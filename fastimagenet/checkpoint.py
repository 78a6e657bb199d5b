"""Checkpoints: written atomically each epoch (a crash mid-write leaves the previous file, never a truncated one),
the best-k kept by val top-1, and read back for an exact resume.

Files in a run directory:
  last.pt              the latest resumable state: the end of the last finished epoch, or a point inside an epoch
                       (a stop signal, runtime.checkpoint_every_min); what `train --resume RUN_DIR` continues from
  best.pt              the best epoch so far (a hard link to one of the best-epochNNN.pt files)
  best-epochNNN.pt     the `runtime.keep_best` best epochs
  best-ema.pt          runs with an EMA: the epoch whose EMA weights scored best (`export --ema` takes it)
  interrupted.pt       the weights where a stop signal (Ctrl-C, SIGTERM) stopped the run (for export); removed
                       once a resumed run finishes an epoch, as last.pt is then newer
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from fastimagenet.common.atomic import atomic_output
from fastimagenet.common.errors import UserError
from fastimagenet.config import Config, apply_overrides, differing_keys, from_saved, validate


def atomic_torch_save(obj, path: Path) -> None:
    # Through a Python file: a full disk is then an OSError (which atomic_output turns into a message naming the
    # file); torch.save given a path reports it as "RuntimeError: unexpected pos".
    with atomic_output(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)


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


# What a resume may change: where and how fast the rest of the run goes, never what it trains. Every other key
# (epochs, schedule.*, optim.*, model.* but sync_bn, data.* but the paths, runtime.seed, ...) shaped the epochs
# already run: changing it on resume would give a run that no single config describes (e.g. `epochs=3` on a
# finished 2-epoch run re-stretched an LR schedule that had already reached zero).
RESUME_MAY_CHANGE = (
    "data.train", "data.val",  # the same data, at its path on this machine
    "loader.",  # every backend feeds the same augmentation (but synthetic_samples, refused below)
    "model.sync_bn",
    "runtime.device", "runtime.precision", "runtime.compile", "runtime.compile_backend", "runtime.channels_last",
    "runtime.log_interval", "runtime.peak_tflops", "runtime.ddp_bucket_mb", "runtime.ddp_static_graph",
    "runtime.keep_best", "runtime.eval_every",
)


def may_change_on_resume(key: str) -> bool:
    if key == "loader.synthetic_samples":
        return False
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUME_MAY_CHANGE)


def check_resume_changes(saved: Config, cfg: Config, run_dir: Path) -> None:
    """Refuse a resumed config that differs from the saved one in a key that shaped the epochs already run."""
    refused = [(key, old, new) for key, old, new in differing_keys(saved, cfg) if not may_change_on_resume(key)]
    if refused:
        changes = ", ".join(f"'{key}' ({old!r} -> {new!r})" for key, old, new in refused)
        raise UserError(f"{run_dir}: --resume continues the run as it was planned and trained; {changes} would "
                        "change its past. A resume may change only where and how it runs (data.train/data.val "
                        "paths, loader.*, runtime.device, runtime.precision, runtime.compile, ...); to train "
                        "longer or differently, start a new run")


def resume_config(run_dir: Path, overrides: list[str]) -> tuple[Config, Path]:
    """The config a run saved (plus `key=value` overrides of runtime settings, e.g. runtime.device; see
    RESUME_MAY_CHANGE) and the checkpoint to continue from. The run continues in its own directory."""
    run_dir = Path(run_dir)
    config_path, last = run_dir / "config.yaml", run_dir / "last.pt"
    if not config_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    if not last.is_file():
        raise UserError(f"{run_dir}: no finished epoch to resume from (no last.pt)")
    saved = from_saved(config_path)
    cfg = from_saved(config_path)
    apply_overrides(cfg, overrides)
    if cfg.runtime.out_dir != saved.runtime.out_dir and Path(cfg.runtime.out_dir) != run_dir:
        raise UserError(f"{run_dir}: --resume continues in the run's own directory; drop runtime.out_dir")
    cfg.runtime.out_dir = saved.runtime.out_dir = str(run_dir)
    check_resume_changes(saved, cfg, run_dir)
    validate(cfg)
    return cfg, last


def auto_resume(cfg: Config) -> Path | None:
    """`train --resume auto`: the checkpoint to continue from in runtime.out_dir, or None to start afresh there
    (no checkpoint yet). The whole command line is repeated by every restart (a scheduler's requeue, torchrun's
    --max-restarts), so it must agree with the run it finds; a run that has finished is a UserError saying so."""
    if not cfg.runtime.out_dir:
        raise UserError("--resume auto needs runtime.out_dir: the directory where a restart finds the run")
    run_dir = Path(cfg.runtime.out_dir)
    last = run_dir / "last.pt"
    if not last.is_file():
        return None
    check_resume_changes(from_saved(run_dir / "config.yaml"), cfg, run_dir)
    state = load_checkpoint(last)
    if "position" not in state and state["epoch"] + 1 >= cfg.epochs:
        raise UserError(f"{run_dir}: the run already finished its {cfg.epochs} epochs; nothing to resume")
    return last


class CheckpointKeeper:
    """Writes last.pt every epoch and keeps the `keep_best` best epochs by val top-1 (ties keep the earlier), and,
    for runs with an EMA, the epoch whose EMA scored best (its own ranking: the EMA often peaks at another epoch).
    Every rank ranks the epochs; only rank 0 has a run directory and saves."""

    def __init__(self, run_dir: Path | None, keep_best: int, ranking: list[tuple[float, int]] | None = None,
                 ema_best: tuple[float, int] | None = None):
        self.run_dir, self.keep_best = run_dir, keep_best
        self.ranking = [tuple(r) for r in ranking or []]  # (top1, epoch), best first
        self.ema_best = tuple(ema_best) if ema_best else None  # (ema top1, epoch)

    def best_top1(self) -> float:
        return self.ranking[0][0] if self.ranking else -1.0

    def rank(self, epoch: int, top1: float, ema_top1: float | None = None) -> None:
        ranking = [r for r in self.ranking if r[1] != epoch] + [(top1, epoch)]
        self.ranking = sorted(ranking, key=lambda r: (-r[0], r[1]))[: self.keep_best]
        if ema_top1 is not None and (self.ema_best is None or self.ema_best[1] == epoch
                                     or ema_top1 > self.ema_best[0]):
            self.ema_best = (ema_top1, epoch)

    def save(self, state: dict, epoch: int) -> None:
        """Call after `rank(epoch, ...)`, with a state that carries the new ranking. A finished epoch makes an
        earlier Ctrl-C's interrupted.pt stale (last.pt is newer), so it goes."""
        atomic_torch_save(state, self.run_dir / "last.pt")
        self.link_best(epoch)
        (self.run_dir / "interrupted.pt").unlink(missing_ok=True)

    def save_position(self, state: dict, stopped: bool) -> None:
        """A checkpoint inside an epoch (its `position` says where): last.pt, which a resume continues from exactly;
        it ranks nothing. `stopped`: the run stops here, and interrupted.pt names the same weights for export."""
        atomic_torch_save(state, self.run_dir / "last.pt")
        if stopped:
            self.mark_stopped()

    def mark_stopped(self) -> None:
        """The run stops at last.pt: interrupted.pt names the same weights (for `export --checkpoint interrupted`)."""
        _atomic_link(self.run_dir / "last.pt", self.run_dir / "interrupted.pt")

    def link_best(self, epoch: int) -> None:
        """Give last.pt (the checkpoint of `epoch`) its best-epoch names and drop the epochs no longer ranked.
        Idempotent: a resume calls it again for the checkpoint it continues from, finishing links that a kill
        between writing last.pt and linking it left undone."""
        last = self.run_dir / "last.pt"
        if self.ema_best is not None and self.ema_best[1] == epoch:
            _atomic_link(last, self.run_dir / "best-ema.pt")
        kept = {e for _, e in self.ranking}
        if epoch not in kept:
            return
        _atomic_link(last, self.run_dir / f"best-epoch{epoch:03d}.pt")
        if self.ranking[0][1] == epoch:
            _atomic_link(last, self.run_dir / "best.pt")
        for path in self.run_dir.glob("best-epoch*.pt"):
            if int(path.stem.removeprefix("best-epoch")) not in kept:
                path.unlink(missing_ok=True)
