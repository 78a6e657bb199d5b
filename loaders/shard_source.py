"""A sharded split (dataset_tools/shards.py) as the samples a loader backend reads: local folder or s3:// prefix.

Order, the same contract as every backend (loaders/base.py):
- An epoch's order is a pure function of (seed, epoch): the shards in a permutation drawn from them, taken in
  groups of consecutive shards holding at least `loader.shuffle_buffer` samples, each group's samples shuffled
  uniformly by the same generator (shard_order). So the whole order is a list computed up front: a resumed epoch (set_epoch(epoch, first_step)) skips to its position,
  and every rank computes the same list.
- Ranks take contiguous parts of that list (training first drops the tail that does not divide evenly, so every rank
  runs the same number of steps): disjoint samples, and each rank reads about 1/world_size of the shards rather than
  every shard, which is what keeps a large job's traffic per node small.
- Validation reads every sample once, in the dataset's order.
How random this is against a uniform shuffle depends on how mixed each shard is: `convert --format shards` writes
samples in a shuffled order by default, so a shard holds samples of many classes (README: the measured classes per
batch).

Remote splits are read from a local cache (dataset_tools/object_cache.py): the batch sampler, in the training
process, fetches the shards of the next batches ahead of the workers that decode them (`fetched`), so retries are
counted where the metrics are kept and a worker reads a whole, verified local file; the shards of those batches are
pinned against eviction meanwhile. A worker that still finds a shard gone (evicted by another process of the node)
fills it again itself.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fastimagenet.common.errors import UserError
from fastimagenet.dataset_tools import object_store
from fastimagenet.dataset_tools.object_cache import ObjectCache
from fastimagenet.dataset_tools.shards import ShardIndex, is_shard_dataset, read_index
from fastimagenet.loaders.base import LoaderSpec

__all__ = ["ShardSource", "is_shard_dataset", "shard_order"]

_FETCH_THREADS = 4
_SHARDS_AHEAD = 2  # shards fetched beyond those the next batch needs
_OPEN_SHARDS = 16  # descriptors a process keeps open


def shard_order(index: ShardIndex, seed: int, epoch: int, window: int) -> np.ndarray:
    """Every sample once: the shards in a random order, taken in groups of consecutive shards holding at least
    `window` samples, each group's samples in a uniformly random order. A function of (seed, epoch). A shard is
    read only while its group is, so the shards an epoch needs at once (and keeps in a node's cache) are about one
    group's, whatever the data's size."""
    rng = np.random.default_rng([seed, epoch])
    parts, group, held = [], [], 0
    for shard in rng.permutation(len(index.shards)).tolist():
        info = index.shards[shard]
        group.append(np.arange(info.first, info.first + info.samples))
        held += info.samples
        if held >= window:
            parts.append(rng.permutation(np.concatenate(group)))
            group, held = [], 0
    if group:
        parts.append(rng.permutation(np.concatenate(group)))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


class ShardMember:
    """One sample's JPEG inside its shard, as the decoder reads it (`read_bytes`); named in messages by its shard
    and key."""

    __slots__ = ("source", "index")

    def __init__(self, source: ShardSource, index: int):
        self.source, self.index = source, index

    def read_bytes(self) -> bytes:
        return self.source.read(self.index)

    def __str__(self) -> str:
        return f"{self.source.index.shard_url(int(self.source.index.shard_of[self.index]))}#{self.index:09d}.jpg"


class _Samples:
    """(ShardMember, label) by sample index: the shape of an ImageFolder's sample list."""

    def __init__(self, source: ShardSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.index)

    def __getitem__(self, i: int) -> tuple[ShardMember, int]:
        return ShardMember(self.source, i), int(self.source.index.labels[i])


class _Names:
    """Each sample's name (its shard and key), for messages, by sample index."""

    def __init__(self, source: ShardSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.index)

    def __getitem__(self, i: int) -> str:
        return str(ShardMember(self.source, i))


class ShardSource:
    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.index = read_index(spec.path.rstrip("/"))
        self.classes = self.index.classes
        if spec.classes is not None and list(spec.classes) != list(self.classes):
            raise UserError(f"{spec.path}: its classes differ from the training split's (convert it with the train "
                            "split, or with --classes-from)")
        self.sizes = self.index.sizes
        self.samples, self.names = _Samples(self), _Names(self)
        self.skipped: dict[str, str] = {}  # convert reported what it left out; a shard holds only decodable images
        remote = object_store.is_remote(spec.path)
        self.cache = ObjectCache(spec.options.cache_dir, spec.options.cache_gb) if remote else None
        if not remote:  # a remote shard that is missing is found when it is fetched, ahead of the workers
            for shard in range(len(self.index.shards)):
                if not Path(self.index.shard_url(shard)).is_file():
                    raise UserError(f"{self.index.shard_url(shard)}: no such shard (the dataset is incomplete; "
                                    "write it again with `fastimagenet convert --format shards`)")
        # shard -> open descriptor, per process (opened after a fork), the least recently opened closed first: an
        # evicted file's space is freed only when no descriptor holds it
        self._files: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        self._orders: dict[int, np.ndarray] = {}  # epoch -> order, for the current and the next epoch

    def order(self, epoch: int) -> np.ndarray:
        """This rank's samples of `epoch`, in order (see the module notes)."""
        count, world, rank = len(self.index), self.spec.world_size, self.spec.rank
        if not self.spec.train:
            return np.array_split(np.arange(count), world)[rank]
        if epoch not in self._orders:  # computed once per epoch (~0.04 s for ImageNet), asked for more often
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            share = count // world
            order = shard_order(self.index, self.spec.seed, epoch, self.spec.options.shuffle_buffer)
            self._orders[epoch] = order[rank * share : (rank + 1) * share]
        return self._orders[epoch]

    def local_shard(self, shard: int) -> Path:
        """The shard's local file: in the split's folder, or the cache's copy (fetched when missing)."""
        if self.cache is None:
            return Path(self.index.shard_url(shard))
        info = self.index.shards[shard]
        return self.cache.local(self.index.shard_url(shard), info.sha256, info.sha256, info.bytes)

    def read(self, i: int) -> bytes:
        """Sample i's JPEG bytes."""
        shard = int(self.index.shard_of[i])
        if os.getpid() != self._pid:  # a forked worker opens its own descriptors
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            if len(self._files) >= _OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
            self._files[shard] = os.open(self.local_shard(shard), os.O_RDONLY)
        data = os.pread(self._files[shard], int(self.index.lengths[i]), int(self.index.offsets[i]))
        if len(data) != self.index.lengths[i]:
            raise UserError(f"{self.index.shard_url(shard)}: shorter than its index says (a damaged shard)")
        return data

    def fetched(self, batches: Iterable[list[int]]) -> Iterator[list[int]]:
        """`batches` (lists of sample indices), each handed on once its shards are local; the shards of the next
        ones are fetched meanwhile. Local splits are read in place."""
        if self.cache is None:
            yield from batches
            return
        batches = list(batches)
        shard_of = self.index.shard_of
        needed: list[int] = []  # shards in the order of their first use
        first_use, last_use = {}, {}
        for b, batch in enumerate(batches):
            for shard in dict.fromkeys(shard_of[batch].tolist()):
                if shard not in first_use:
                    first_use[shard] = len(needed)
                    needed.append(shard)
                last_use[shard] = b
        futures: dict[int, Future] = {}
        pinned = set()  # this pass's pins (another pass, e.g. DALI's next epoch, may hold pins of its own)
        with ThreadPoolExecutor(_FETCH_THREADS) as pool:
            try:
                for b, batch in enumerate(batches):
                    shards = dict.fromkeys(shard_of[batch].tolist())
                    horizon = max(first_use[s] for s in shards) + _SHARDS_AHEAD
                    for shard in needed[len(futures): horizon + 1]:
                        pinned.add(shard)
                        self.cache.pinned[self._cache_path(shard)] += 1
                        futures[shard] = pool.submit(self.local_shard, shard)
                    for shard in shards:
                        futures[shard].result()  # raises the fill's error (a UserError naming the shard)
                    yield batch
                    for shard in shards:
                        if last_use[shard] == b:
                            pinned.discard(shard)
                            self.cache.pinned[self._cache_path(shard)] -= 1
            finally:
                for future in futures.values():
                    future.cancel()
                for shard in pinned:
                    self.cache.pinned[self._cache_path(shard)] -= 1

    def _cache_path(self, shard: int) -> Path:
        info = self.index.shards[shard]
        return self.cache.path_for(info.sha256, info.name)
