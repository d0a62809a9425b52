"""The kinds of failure a user sees, and every exit code tuner uses, in one place.

A :class:`UserError` is something the user can fix (a bad study file, an unknown study, a
bad flag): exit 2, nothing written. A :class:`RuntimeFailure` is something that went wrong
around them (the database is down, a file cannot be written): exit 1. The CLI prints either
as one line. The worker's child processes use two more codes to tell their parent what to do.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # the environment failed (RuntimeFailure)
    USER_ERROR = 2  # bad input (UserError); nothing was written
    CHILD_STOPPED = 3  # a worker child stopped with a message: not restarted
    CHILD_CRASHED = 70  # a worker child crashed, or ended a hung trial: restarted
    INTERRUPTED = 130  # Ctrl-C before any trial ran


class TunerError(Exception):
    """Base of the errors the CLI turns into one line and an exit code."""

    exit_code = ExitCode.FAILURE


class UserError(TunerError):
    """Bad input: a study file, a flag, a study name. Nothing was written."""

    exit_code = ExitCode.USER_ERROR


class RuntimeFailure(TunerError):
    """The environment failed: storage unreachable, file not writable, artifact missing."""

    exit_code = ExitCode.FAILURE
