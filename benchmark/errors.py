"""Exceptions that the CLI turns into a one-line message and exit code 2.

Every message names the problem and the fix; nothing else in the code base prints user errors.
"""

from __future__ import annotations


#: Exit code of a run stopped by its time limit: it finished nothing and resumes (distinct from errors).
EXIT_PAUSED = 3


class BenchError(Exception):
    """A user-facing error: bad input, missing data, an unusable output directory."""

    exit_code = 2


class DataError(BenchError):
    """The Omniglot data is missing, incomplete or does not match its checksums."""


class ProtocolError(BenchError):
    """An episode specification or protocol name that the protocol cannot serve."""


class ConfigError(BenchError):
    """A learner config override that names an unknown key or has a bad value."""


class PluginError(BenchError):
    """A learner that is unknown, registered twice, or broken."""


class RunStopped(BenchError):
    """A run stopped at an iteration boundary (Ctrl-C, SIGTERM, SIGUSR2, ``--time-limit``) after writing a
    checkpoint; running the same command again resumes it. Not an error: the CLI prints it as a note."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
