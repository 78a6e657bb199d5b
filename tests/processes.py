"""Real processes for the tests that run, signal, kill or restart the program: each starts in a session of its own
with its output in a log file, is waited on for something it *does* (a file it writes, a line it prints), never
for a length of time, and is killed with everything it started (DataLoader workers, torchrun's ranks) when the test
ends, passed or failed. A wait that runs out names what it waited for and shows the process's last output: the
timeouts only guard against hangs, so they are generous."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HANG_GUARD_S = 600  # far above any wait here on a slow 2-core machine; reached only by a hang
ROOT = Path(__file__).resolve().parents[1]
TAIL_CHARS = 4000


class Started:
    """`with Started(command, log) as process:` a running process whose stdout and stderr go to `log`."""

    def __init__(self, command: list[str], log: Path, env: dict | None = None):
        self.what = f"the process `{Path(command[0]).name} {' '.join(part[:40] for part in command[1:3])} ...`"
        self.log = log
        self._log_file = open(log, "w")
        self.popen = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                      env=env, stdin=subprocess.DEVNULL, start_new_session=True)

    def __enter__(self) -> "Started":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        self._log_file.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _tail(self) -> str:
        return f"its last output ({self.log}):\n{self.output()[-TAIL_CHARS:]}"

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float = HANG_GUARD_S) -> None:
        """Returns once `done()` is true; fails, naming `what` it waited for, if the process exits first or hangs."""
        deadline = time.monotonic() + timeout
        while not done():
            code = self.popen.poll()
            if code is not None and not done():
                raise AssertionError(f"{self.what} exited with {code} before {what}; {self._tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what} after {timeout:g} s (a hang?); {self._tail()}")
            time.sleep(0.01)

    def wait_for_line(self, prefix: str, timeout: float = HANG_GUARD_S) -> None:
        """Waits until the process has printed a line that starts with `prefix`."""
        self.wait_for(f"a line starting {prefix!r}",
                      lambda: any(line.startswith(prefix) for line in self.output().splitlines()), timeout)

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def finish(self, timeout: float = HANG_GUARD_S) -> int:
        """The exit code, once the process has ended by itself."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.what} did not end within {timeout:g} s (a hang?); {self._tail()}") from None

    def kill(self) -> None:
        """Ends the process and everything it started (its session's group), if anything is left, and returns once
        all of them are gone (SIGKILL is delivered asynchronously)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        deadline = time.monotonic() + HANG_GUARD_S
        while living_members(self.popen.pid) and time.monotonic() < deadline:
            time.sleep(0.01)


def living_members(group: int) -> list[int]:
    """The processes of a process group that have not ended (a zombie has: only its exit status is left)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # ended while we looked
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, ...
            members.append(int(stat.parent.name))
    return members


def run_to_end(command: list[str], log: Path, env: dict | None = None,
               timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """Runs `command` to its end: its exit code and its output (stdout and stderr together, in `stdout`)."""
    with Started(command, log, env) as process:
        code = process.finish(timeout)
        return subprocess.CompletedProcess(command, code, process.output(), "")


def fastimagenet(*args: str) -> list[str]:
    """The command line of `fastimagenet ARGS` in this environment."""
    return [sys.executable, "-m", "fastimagenet", *args]
