"""A training loader that sends its own process a real signal at a chosen step, shared by the tests that stop a run
in-process (tests/test_preemption.py) and those that kill a rank under torchrun (tests/test_distributed.py, from a
driver script that puts the repository root on sys.path). The signal is real, so the run's own handlers, or the
kernel for SIGKILL, act on it as they would on a scheduler's or a crash."""

from __future__ import annotations

import os


class SignalAt:
    """Wraps a training loader and sends this process `signum` at batch `step` of epoch `epoch`. With `before_yield`
    it is sent as that batch is fetched, so the loop never trains on it; otherwise once the loop has trained on it,
    while it fetches the next batch (a stopping run then stops after that next step)."""

    def __init__(self, inner, epoch: int, step: int, signum: int, before_yield: bool = False):
        self.inner, self.at, self.signum, self.before_yield = inner, (epoch, step), signum, before_yield
        self.epoch = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch, first_step=0):
        self.epoch = epoch
        self.inner.set_epoch(epoch, first_step)

    def __iter__(self):
        for step, batch in enumerate(self.inner):
            if self.before_yield and (self.epoch, step) == self.at:
                os.kill(os.getpid(), self.signum)
            yield batch
            if not self.before_yield and (self.epoch, step) == self.at:
                os.kill(os.getpid(), self.signum)


def signalling_build(build, epoch: int, step: int, signum: int, before_yield: bool = False):
    """`build` (loaders.build_loader) with the training loaders it builds wrapped in `SignalAt`; others as built."""
    return lambda name, spec: (SignalAt(build(name, spec), epoch, step, signum, before_yield) if spec.train
                               else build(name, spec))
