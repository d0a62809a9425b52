"""The two kinds of failure a user sees, each with its exit code.

A :class:`UserError` is something the user can fix (a bad study file, an unknown study, a
bad flag): exit 2. A :class:`RuntimeFailure` is something that went wrong around them (the
database is down, a file cannot be written): exit 1. The CLI prints either as one line.
"""

from __future__ import annotations


class TunerError(Exception):
    """Base of the errors the CLI turns into one line and an exit code."""

    exit_code = 1


class UserError(TunerError):
    """Bad input: a study file, a flag, a study name. Nothing was written."""

    exit_code = 2


class RuntimeFailure(TunerError):
    """The environment failed: storage unreachable, file not writable, artifact missing."""

    exit_code = 1
