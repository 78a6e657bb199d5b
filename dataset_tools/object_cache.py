"""A node's local copies of remote objects (shards, a .beton), limited in size, least recently used evicted first.

- A file is filled under a temporary name and renamed when whole and verified (object_store.download), so the
  ranks of a node can share the folder: two that fill the same file at once both write whole copies, the last
  rename wins, and a reader never sees a partial file.
- A file is named by its content (its sha256, or the object's URL and ETag), so a dataset written again never
  reads a stale copy.
- "Recently used" is the file's modification time, touched on every use (access times are often not kept).
  Before a fill, the oldest files go until the new one fits; those this process still needs are `pinned` and
  stay. A file another process evicts while in use is still read through its open descriptors, or filled again.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections import Counter
from pathlib import Path

from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools import object_store


def default_folder() -> Path:
    from fastimagenet.dataset_tools.verify import cache_root

    return cache_root() / "objects"


class ObjectCache:
    def __init__(self, folder: str | os.PathLike, limit_gb: float):
        self.folder = Path(folder) if str(folder) else default_folder()
        self.limit = int(limit_gb * 1e9)
        self.pinned: Counter[Path] = Counter()  # files this process still needs, by how many passes need them
        self._lock = threading.Lock()  # fills in this process's threads evict one at a time
        self._told_over_limit = False

    def __getstate__(self) -> dict:
        """Without its lock, which cannot be pickled: workers started by spawn or forkserver make their own."""
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def path_for(self, key: str, name: str) -> Path:
        """Where the object with content key `key` (a sha256, or URL + ETag) and file name `name` is kept."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return self.folder / f"{digest}-{name}"

    def local(self, url: str, key: str, sha256: str | None = None, size: int | None = None) -> Path:
        """The local copy of `url`, filled (and verified) first when it is not here."""
        path = self.path_for(key, Path(url).name)
        try:
            os.utime(path)  # used now
            return path
        except FileNotFoundError:
            pass
        if size is not None and size > self.limit:
            raise UserError(f"{url}: {size / 1e9:.2f} GB does not fit the {self.limit / 1e9:.2f} GB cache "
                            f"({self.folder}); raise loader.cache_gb")
        with self._lock:
            self._make_room(size or 0)
        return object_store.download(url, path, sha256, size)

    def copy_of(self, url: str, companions: tuple[str, ...] = ()) -> Path:
        """The local copy of the remote object `url` (e.g. a .beton), checked against its size and the sha256 stored
        with it when there is one, and beside it those of `url + suffix` for each suffix in `companions` (its
        sidecar). Keyed by the object's ETag: a replaced object is fetched again."""
        size, etag, sha256 = object_store.head(url)
        key = f"{url}|{etag}"
        for suffix in companions:
            self.local(url + suffix, key)
        return self.local(url, key, sha256, size)

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used whole files (never temporary ones, never pinned) until `incoming` fits."""
        self.folder.mkdir(parents=True, exist_ok=True)
        files = []
        for entry in os.scandir(self.folder):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:  # evicted by another process just now
                continue
            files.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
        used = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if used + incoming <= self.limit:
                break
            if self.pinned[path] > 0:
                continue
            path.unlink(missing_ok=True)
            used -= size
        if used + incoming > self.limit and not self._told_over_limit:
            self._told_over_limit = True  # once per process: the same pins recur every group of shards
            print(f"warning: cache {self.folder} holds {(used + incoming) / 1e9:.3g} GB, over its "
                  f"{self.limit / 1e9:.3g} GB limit: the shards the coming batches need stay (a group of "
                  "loader.shuffle_buffer samples and the shards fetched ahead); raise loader.cache_gb or lower "
                  "loader.shuffle_buffer", file=sys.stderr)
