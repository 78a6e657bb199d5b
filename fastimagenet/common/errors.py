"""The one exception type users see: its message names the file or key at fault and what to do."""


class UserError(Exception):
    """Bad input (a path, a file, a config key or value). The CLI prints the message without a traceback."""


class Preempted(Exception):
    """A run stopped by a signal (Ctrl-C, SIGTERM, runtime.preempt_signal) after writing its checkpoint and saying
    so: the CLI exits with 128 + the signal's number and no second message."""

    def __init__(self, signum: int):
        super().__init__(f"stopped on signal {signum}")
        self.exit_code = 128 + signum
