"""A barrier of every rank that outlasts the process group's timeout, for work only some ranks do (a first-run
check of a dataset) while the others wait."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist


def wait_for_every_rank(name: str, timeout: timedelta = timedelta(hours=12)) -> None:
    """A barrier of all ranks in the process group's store rather than a collective, so it may last longer than the
    group's timeout (30 minutes: a first-run check of a large dataset on a slow filesystem can take more). Each call
    of the same `name`, made by every rank in the same order, is a barrier of its own. A rank that dies instead of
    arriving ends the job through torchrun, not through this timeout. No-op alone."""
    if not dist.is_initialized():
        return
    store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
    arrived = store.add(f"fastimagenet/barrier/{name}", 1)
    everyone = f"fastimagenet/barrier/{name}/{(arrived - 1) // world}"  # this round of the barrier
    if arrived % world == 0:
        store.set(everyone, "1")
    store.wait([everyone], timeout)
