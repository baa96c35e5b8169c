"""Typed errors. The library raises them; the CLI prints their one-line message and exits with 2."""


class ExpragError(Exception):
    """Base class: a user-facing problem with input, configuration or data."""


class DataFormatError(ExpragError):
    """Malformed input data; the message names the file, line and field."""


class UnknownTaskTypeError(ExpragError):
    pass


class UnknownEnvError(ExpragError):
    pass


class BankError(ExpragError):
    """A bank directory that is missing, corrupt, too new, or built with another encoder."""


class EnvError(ExpragError):
    """An environment could not start or failed on a task; names the task."""


class RunConfigError(ExpragError):
    """A run directory that holds a run made with other settings (resuming it would mix two runs)."""


class OutputPathError(ExpragError):
    """An output path exprag may not write: someone else's files, or not writable. Nothing was touched."""


class RunLockedError(ExpragError):
    """A run directory (or bank) in use by another exprag process; names that process's PID."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by the CLI's handler so that cleanup runs as for Ctrl-C (staging
    directories removed, locks released) instead of the process vanishing mid-write. A BaseException,
    like KeyboardInterrupt: no ``except Exception`` swallows it."""
