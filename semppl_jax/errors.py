"""User errors are messages, bugs are tracebacks.

A mistake in what the user gave (a config field, a value, a path, the data, a
checkpoint, a workdir another run holds) raises a :class:`UserError`: the launcher
prints its message, one paragraph saying what is wrong, where and what to do, and
exits with :data:`USER_ERROR_EXIT_CODE`. Anything else is a bug and keeps its
traceback. Each class is also the built-in error it refines, so callers that catch
``ValueError`` or ``FileNotFoundError`` still do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

USER_ERROR_EXIT_CODE = 64  # EX_USAGE from sysexits.h; a crash is 1, a preemption 75, the preflight 78


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the field."""


class DataError(UserError, ValueError):
    """A dataset, split, folder, CSV or label list that cannot be used as given."""


class MissingDataError(UserError, FileNotFoundError):
    """A dataset, file or directory that is not where the config says."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or released-format pickle that cannot be used."""


class WorkdirError(UserError, OSError):
    """A workdir that cannot be written, or that another live run holds."""


def near_misses(name: str, choices: Iterable[str], n: int = 3) -> str:
    """`` (did you mean a, b?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""
