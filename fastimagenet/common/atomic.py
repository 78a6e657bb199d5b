"""Files that are either whole or absent: every file the project writes goes through `atomic_output`."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fastimagenet.common.errors import UserError

_WHY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "the file system is read-only", errno.EACCES: "no permission to write there",
        errno.EPERM: "no permission to write there", errno.ENOTDIR: "a part of the path is a file, not a directory",
        errno.EFBIG: "the file is too large for this file system"}


class WriteFailed(UserError, OSError):
    """A file could not be written (disk full, read-only, ...). A UserError, so the CLI prints its message (which
    names the file) without a traceback, and an OSError, so code that can live without the file still catches it."""

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary name beside `path` to write to; when the block ends without error the temporary file is
    renamed over `path` (one atomic step), otherwise it is removed. A crash mid-write leaves the previous file, or
    none, never a half-written one. Temporary names are `.<name>.tmp<pid>`: hidden, unique per process, and found
    by `remove_partial_writes` after a kill.

    Any OSError while writing (the block's own writes, making the directory, the rename) becomes WriteFailed, whose
    message names `path`, why, and that the previous file is unchanged: one place for every file the project writes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except WriteFailed:
        raise  # a nested atomic_output already said which file
    except OSError as exc:
        raise _write_failed(path, exc) from exc
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. the directory itself is gone or not a directory: there is no temporary file to remove


def _write_failed(path: Path, exc: OSError) -> WriteFailed:
    why = _WHY.get(exc.errno) or exc.strerror or str(exc)
    left = "the previous file is unchanged" if path.exists() else "nothing was written"
    detail = f"{type(exc).__name__}: {exc}"
    return WriteFailed(exc.errno or errno.EIO, f"{path}: could not be written: {why} ({detail}); {left}")
