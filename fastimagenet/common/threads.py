"""torch's thread count kept across code that changes it: FFCV sets the importing thread's count when it is first
imported and when its Loader is built."""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def torch_threads_kept():
    """torch's thread count of this thread as it was before the block. FFCV sets the calling thread's count (with
    numba's) when it is first imported (to 1: ffcv/pipeline/compiler.py) and when a Loader is built (to its
    workers); code that imports FFCV or builds its Loader does it in this block, so training and evaluation keep
    torch's threads (its default, or OMP_NUM_THREADS)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def importing_ffcv():
    """Where FFCV is imported: torch's thread count kept (torch_threads_kept), and numba's threading layer chosen
    before FFCV's parallel code first runs. numba prefers TBB where libtbb is installed (Debian's OpenCV pulls it
    in), and its TBB pool hangs at interpreter exit in a process confined to one CPU (`taskset -c 0 fastimagenet
    convert ...` wrote its file and never exited: numba's unload_tbb waits in a TBB task group for ever). There GNU
    OpenMP goes first, which is thread-safe as FFCV's epoch threads need; the forks that follow (FFCV's writer
    processes, DataLoader workers) run no numba parallel code, which is what OpenMP is not safe for."""
    import numba

    one_cpu = hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) == 1
    if one_cpu and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    with torch_threads_kept():
        yield
