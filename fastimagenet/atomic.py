"""Files that are either whole or absent: every file the project writes goes through `atomic_output`."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary name beside `path` to write to; when the block ends without error the temporary file is
    renamed over `path` (one atomic step), otherwise it is removed. A crash mid-write leaves the previous file, or
    none, never a half-written one. Temporary names are `.<name>.tmp<pid>`: hidden, unique per process, and found
    by `remove_partial_writes` after a kill."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
