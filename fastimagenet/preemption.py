"""Stopping cleanly when asked: SIGTERM (what Slurm, Kubernetes and torchrun send on preemption), SIGINT (Ctrl-C)
and `runtime.preempt_signal` (e.g. Slurm's `--signal=USR1@60`).

The first signal asks the run to stop: every rank finishes its current optimizer step, the ranks agree on it, rank 0
writes a checkpoint it can resume from exactly, and the process exits with 128 + the signal's number. A timer makes
sure the process is gone within `runtime.preempt_grace_s` whatever happens; a second signal exits at once. Either
way the checkpoint on disk is whole: every file is written to a temporary name and renamed
(fastimagenet/common/atomic.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

from fastimagenet.distributed import all_reduce_sum


class StopSignals:
    """Handlers for the stop signals while a run trains (`with StopSignals(...) as stop:`)."""

    def __init__(self, names: list[str], grace_s: float):
        self.signals = [getattr(signal, name) for name in names]
        self.grace_s = grace_s
        self.signum = 0  # the first stop signal received; 0: none
        self._previous: dict[int, object] = {}
        self._deadline: threading.Timer | None = None

    def __enter__(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        """The run is over (its checkpoint written): the old handlers are back and the deadline is off."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._deadline is not None:
            self._deadline.cancel()

    def _handle(self, signum, frame) -> None:
        if self.signum:  # asked twice: leave now (the checkpoint on disk is the previous, whole one)
            os._exit(128 + signum)
        self.signum = signum
        self._deadline = threading.Timer(self.grace_s, os._exit, args=(128 + signum,))
        self._deadline.daemon = True
        self._deadline.start()
        print(f"\n{signal.Signals(signum).name}: stopping after the current step; a checkpoint follows "
              f"(at most {self.grace_s:g} s)", file=sys.stderr, flush=True)

    def agreed(self, device: torch.device, distributed: bool) -> bool:
        """Whether any rank was asked to stop. Under DDP this is a collective (a sync): call it at the same step on
        every rank. A signal can reach the ranks a step apart, so they agree before anyone stops."""
        if not distributed:
            return bool(self.signum)
        flag = all_reduce_sum(torch.tensor([float(bool(self.signum))], device=device))
        asked = flag.item() > 0  # sync: at the loop's log interval only
        if asked and not self.signum:
            self.signum = signal.SIGTERM  # another rank was signalled: stop as if this one had been too
        return asked
