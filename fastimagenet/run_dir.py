"""The run directory: one run per directory. A directory that already holds a run is refused unless the user says
to continue it (`train --resume`) or to replace it (`train --overwrite`); a new run's directory is made only when
training is about to start, and removed again when the run fails before its first epoch ends, so a mistake in the
command line leaves nothing behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fastimagenet.common.errors import UserError

# What a run writes (see checkpoint.py for the checkpoints).
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "best-ema.pt", "best-epoch*.pt", "interrupted.pt",
             "run.png", "tensorboard", ".*.tmp*")


def run_files(path: Path) -> list[Path]:
    """The files and folders of a run found in `path` (none when it does not exist)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted({found for pattern in RUN_FILES for found in path.glob(pattern)})


def check_out_dir(out_dir: str, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a directory that holds another run (its checkpoints would be replaced, its
    metrics appended to and its plot drawn over). Every rank calls this before any work; it only reads."""
    if resuming or overwrite or not out_dir:
        return
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: runtime.out_dir is a file, not a directory")
    found = run_files(path)
    if found:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise UserError(f"{path}: runtime.out_dir already holds a run ({names}). Continue it with "
                        f"`fastimagenet train --resume {path}`, replace it with `fastimagenet train --overwrite ...`, "
                        "or choose another runtime.out_dir")


def clear_run(path: Path) -> None:
    """Remove a previous run's files from `path` (only those: anything else the user keeps there stays)."""
    for found in run_files(path):
        if found.is_dir() and not found.is_symlink():
            shutil.rmtree(found)
        else:
            found.unlink(missing_ok=True)


def make_run_dir(out_dir: Path, overwrite: bool) -> bool:
    """Create the run directory (rank 0 only), clearing a previous run first with `overwrite`. Returns whether the
    directory is new, so a run that fails before its first epoch can remove it again."""
    out_dir = Path(out_dir)
    if overwrite:
        clear_run(out_dir)
    new = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    return new


def discard_run_dir(out_dir: Path, new: bool) -> None:
    """Undo `make_run_dir` for a run that failed before its first epoch ended: the directory when this run made
    it, else only the files it wrote."""
    if new:
        shutil.rmtree(out_dir, ignore_errors=True)
    else:
        clear_run(out_dir)
