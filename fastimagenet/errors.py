"""The one exception type users see: its message names the file or key at fault and what to do."""


class UserError(Exception):
    """Bad input (a path, a file, a config key or value). The CLI prints the message without a traceback."""
