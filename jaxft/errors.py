"""The errors a user can fix: bad config, bad data, bad paths. The CLI prints these as one line
(naming the key, file, record or field to change); every other exception is a bug or an outside
failure (a shape mismatch, an XLA or storage error) and keeps its traceback.

Each subclasses the builtin it replaces, so `except ValueError` / `except OSError` around jaxft
calls keeps working:

    raise ConfigError("config key train.batch_size: 0 rows; use >= 1")
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user fixes by changing a config key, a file, a record or a path; the
    message names which and how."""


class ConfigError(UserError, ValueError):
    """A config key, flag or config file that cannot run (message: the key, the value, the fix)."""


class DataError(UserError, ValueError):
    """A data file or record that cannot train (message: the file, the line or record, the field)."""


class PathError(UserError, OSError):
    """A path that is missing, of the wrong kind or not writable (message: the path and the key
    or flag that gave it)."""


class SetupError(UserError, RuntimeError):
    """An optional dependency a command needs is not installed (message: what to pip install)."""


__all__ = ["ConfigError", "DataError", "PathError", "SetupError", "UserError"]
