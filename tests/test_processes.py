"""The tests' own process helper (tests/processes.py): a wait that cannot succeed fails saying what it waited for,
with the process's last output, and nothing the process started outlives the test."""

from __future__ import annotations

import sys

import pytest

from tests.processes import Started, living_members

# Starts a child that would outlive it, says so, then waits for ever without doing what the test waits for.
_HANGS_WITH_A_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
print(f"child {child.pid} started", flush=True)
time.sleep(3600)
"""


def test_a_wait_that_runs_out_names_its_event_shows_the_output_and_leaves_no_process(tmp_path):
    with pytest.raises(AssertionError) as failure:
        with Started([sys.executable, "-c", _HANGS_WITH_A_CHILD], tmp_path / "hang.log") as process:
            process.wait_for_line("child ")
            group = process.popen.pid
            assert len(living_members(group)) == 2  # the process and the child it started
            process.wait_for("a checkpoint", (tmp_path / "last.pt").exists, timeout=0.5)  # never written
    message = str(failure.value)
    assert "gave up waiting for a checkpoint after 0.5 s" in message
    assert f"({tmp_path / 'hang.log'}):\nchild " in message  # its last output, from the log file
    assert living_members(group) == []


def test_a_process_that_exits_first_is_reported_with_its_code_and_output(tmp_path):
    with Started([sys.executable, "-c", "print('configuration' + ' error'); raise SystemExit(2)"],
                 tmp_path / "exits.log") as process:
        with pytest.raises(AssertionError, match=r"(?s)exited with 2 before the run to pause;.*:\nconfiguration error"):
            process.wait_for("the run to pause", (tmp_path / "paused").exists)
