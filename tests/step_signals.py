"""Loaders that act at a chosen step, shared by the tests that stop a run in-process (tests/test_preemption.py) and
those that stop, kill or restart a real process (tests/test_resume.py, tests/test_distributed.py).

- `SignalAt` sends its own process a real signal at a step, so the run's own handlers, or the kernel for SIGKILL,
  act on it as they would on a scheduler's or a crash.
- `PauseAt` holds the run still at a step and says so in a file, so a test can signal it from outside exactly
  there, on a machine of any speed: it goes on once the run's stop handler has seen a signal (a SIGKILL, which no
  handler sees, ends it where it waits).

`python -m tests.step_signals pause EPOCH STEP READY_FILE ARGS...` runs `fastimagenet ARGS...` with its training
loader paused before batch STEP of epoch EPOCH."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

PAUSE_GUARD_S = 600  # a paused run nobody signals gives up after this long instead of waiting for ever


class _AtStep:
    """Wraps a training loader; subclasses act at batch `step` of epoch `epoch` (`_before` / `_after` the yield)."""

    def __init__(self, inner, epoch: int, step: int):
        self.inner, self.at = inner, (epoch, step)
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
            here = (self.epoch, step) == self.at
            if here:
                self._before()
            yield batch
            if here:
                self._after()

    def _before(self):
        pass

    def _after(self):
        pass


class SignalAt(_AtStep):
    """Sends this process `signum` at the step. With `before_yield` it is sent as that batch is fetched, so the loop
    never trains on it; otherwise once the loop has trained on it, while it fetches the next batch (a stopping run
    then stops after that next step)."""

    def __init__(self, inner, epoch: int, step: int, signum: int, before_yield: bool = False):
        super().__init__(inner, epoch, step)
        self.signum, self.before_yield = signum, before_yield

    def _before(self):
        if self.before_yield:
            os.kill(os.getpid(), self.signum)

    def _after(self):
        if not self.before_yield:
            os.kill(os.getpid(), self.signum)


class PauseAt(_AtStep):
    """Before the step's batch is yielded: writes `ready_file`, then waits until `resume()` is true."""

    def __init__(self, inner, epoch: int, step: int, ready_file: Path, resume):
        super().__init__(inner, epoch, step)
        self.ready_file, self.resume = ready_file, resume

    def _before(self):
        self.ready_file.write_text(f"paused before step {self.at[1]} of epoch {self.at[0]}\n")
        deadline = time.monotonic() + PAUSE_GUARD_S
        while not self.resume():
            if time.monotonic() > deadline:
                raise RuntimeError(f"paused at {self.at} for {PAUSE_GUARD_S} s and no signal came")
            time.sleep(0.005)


def signalling_build(build, epoch: int, step: int, signum: int, before_yield: bool = False):
    """`build` (loaders.build_loader) with the training loaders it builds wrapped in `SignalAt`; others as built."""
    return _wrapping_train(build, lambda loader: SignalAt(loader, epoch, step, signum, before_yield))


def _wrapping_train(build, wrap):
    return lambda name, spec: wrap(build(name, spec)) if spec.train else build(name, spec)


def _run_paused(epoch: int, step: int, ready_file: Path, args: list[str]) -> int:
    """`fastimagenet ARGS` paused at (epoch, step) until its stop handler has handled a signal."""
    from fastimagenet import loaders
    from fastimagenet.cli import main
    from fastimagenet.preemption import StopSignals

    handled = threading.Event()
    handle = StopSignals._handle

    def handle_and_note(self, signum, frame):
        handle(self, signum, frame)
        handled.set()

    StopSignals._handle = handle_and_note
    loaders.build_loader = _wrapping_train(loaders.build_loader,
                                           lambda loader: PauseAt(loader, epoch, step, ready_file, handled.is_set))
    return main(args)


if __name__ == "__main__":
    if sys.argv[1:2] != ["pause"] or len(sys.argv) < 5:
        sys.exit("usage: python -m tests.step_signals pause EPOCH STEP READY_FILE FASTIMAGENET_ARGS...")
    sys.exit(_run_paused(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:]))
