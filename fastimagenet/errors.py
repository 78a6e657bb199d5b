"""The one exception type users see: its message names the file or key at fault and what to do."""


class UserError(Exception):
    """Bad input (a path, a file, a config key or value). The CLI prints the message without a traceback."""


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C whose outcome the command already reported (e.g. where the weights were saved): the CLI exits with
    status 130 without a second message."""
