"""Errors that reach the user as one line and exit code 2."""


class UserError(Exception):
    """Bad input or usage: the CLI prints ``pilot: error: <message>`` and exits 2.

    The message must be one line, name what is wrong (file, line, task id, key) and,
    where possible, what to do about it.
    """


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3
