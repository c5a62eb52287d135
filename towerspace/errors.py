"""The errors a user can cause: the command line prints them as one line and exits 2.

Anything else that escapes a command is a bug, reported as one (traceback, exit 1). Each class
subclasses ValueError, so code that caught ValueError before still does.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave: one line that names the field, the value and what is
    allowed. `exit_code` is what the command line exits with."""

    exit_code = 2


class ConfigError(UserError):
    """An experiment, space or command-line value that is not allowed."""


class TowerSpecError(UserError):
    """A tower count, group width or schedule that does not fit the layers it is given to."""


class DataError(UserError):
    """A data set that cannot be read as asked (missing folder, empty class, corrupt file)."""


class StorageError(UserError):
    """A sweep folder that cannot or must not be written (outside storage, not a sweep)."""


class SweepLocked(StorageError):
    """Another driver is using the sweep folder."""


class DiskFull(StorageError):
    """The storage ran out of space: the sweep stopped with what was on disk (exit 1, since the
    input was fine; --resume continues once space is freed)."""

    exit_code = 1
