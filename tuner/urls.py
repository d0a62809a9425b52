"""Storage URLs: parsed with errors a user can act on, and printed with the password masked.

Anything wrong with a URL is the user's to fix (exit 2). :func:`mask` is the only way a URL is
ever shown, in messages and logs alike; it works on URLs that do not even parse.
"""

from __future__ import annotations

import sqlalchemy
from sqlalchemy import exc as sa_exc

from tuner.errors import UserError


def parse_url(url: str) -> sqlalchemy.engine.URL:
    """Parse a storage URL, or raise a :class:`UserError` saying how to write it."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sa_exc.ArgumentError:
        raise UserError("malformed storage URL: expected e.g. sqlite:///tuner.db or "
                        "postgresql+psycopg2://user@host:5432/dbname") from None
    except ValueError:  # a port that is not a number
        raise UserError(f"storage URL {_masked_text(url)}: the port must be a number, as in "
                        "postgresql+psycopg2://user@host:5432/dbname") from None
    if parsed.host and "@" in parsed.host:
        # The password holds an '@' that is not percent-encoded: the URL splits at its first
        # '@', and the rest of the password would be taken for the host name (and printed).
        raise UserError(f"storage URL {_masked_text(url)}: the password contains '@'; write "
                        "it as %40, or give the password with --storage-password-file or "
                        "$PGPASSWORD instead")
    if parsed.get_backend_name() == "sqlite" and parsed.host:
        raise UserError(f"storage URL {_masked_text(url)}: an SQLite URL has three slashes "
                        "before a relative path (sqlite:///tuner.db) and four before an "
                        "absolute one (sqlite:////data/tuner.db)")
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UserError(f"storage URL {_masked_text(url)}: an in-memory SQLite database lives "
                        "and dies with one process, and tuner trains in processes of their "
                        "own; give a file, as in sqlite:///tuner.db")
    return parsed


def mask(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print or log)."""
    try:
        return parse_url(url).render_as_string(hide_password=True)
    except UserError:
        return _masked_text(url)


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` filled in (for a password read from a file)."""
    return parse_url(url).set(password=password).render_as_string(hide_password=False)


def _masked_text(url: str) -> str:
    """Mask a URL that may not even parse: everything between ``user:`` and the last ``@``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in credentials else ''}@{host}"
