"""Storage URL → Optuna storage that survives a database restart and never leaks a password.

* Which URL, and which password, is :mod:`tuner.settings`' business; :func:`tuner.urls.mask`
  hides the password wherever a URL is printed.
* Heartbeats (``$TUNER_HEARTBEAT_INTERVAL``, default 10 s; ``$TUNER_GRACE_PERIOD``, default
  30 s) let any worker fail a trial whose process died (:mod:`tuner.budget` does it).
* Every storage call is retried while the database is unreachable (up to
  ``$TUNER_DB_RETRY_SECONDS``, default 300 s); ``pool_pre_ping`` throws away pooled connections
  that died with the server. Each process holds at most ``POOL_SIZE + MAX_OVERFLOW`` connections.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from sqlalchemy import exc as sa_exc

from tuner import settings
from tuner.errors import RuntimeFailure
from tuner.urls import mask, parse_url

POOL_SIZE = 2
MAX_OVERFLOW = 2
_log = logging.getLogger("tuner.storage")


def open_storage(url: str, *, heartbeat: bool = True, wait: bool = False) -> RDBStorage:
    """Connect (creating Optuna's tables if needed); one-line :class:`RuntimeFailure` if not.

    ``wait``: a database that cannot be reached is waited for, as every later call is, for up
    to ``$TUNER_DB_RETRY_SECONDS`` (a worker's process restarted during an outage); without
    it the failure is at once (a user's command, where a mistyped URL must not hang)."""
    parsed = parse_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs.update(pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_recycle=1800)
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": settings.heartbeat_interval(),
                  "grace_period": settings.grace_period()}
    deadline = time.monotonic() + settings.db_retry_seconds()
    created_meanwhile = outage = 0
    while True:
        try:
            with _quiet_optuna():
                return ResilientRDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError,
                ValueError) as exc:
            if _created_meanwhile(exc) and created_meanwhile < 4:
                # Another process created Optuna's tables in this new database at the same
                # moment (workers started together): they are there now, open them again.
                # (SQLite says so with an OperationalError, "table studies already exists".)
                created_meanwhile += 1
                time.sleep(0.2 * created_meanwhile)
                continue
            if not (wait and is_disconnect(exc)) or time.monotonic() > deadline:
                raise unreachable(url, exc) from None
            if outage == 0:
                _log.warning("database unreachable (%s); retrying", _first_line(exc, None))
            time.sleep(retry_interval(outage))
            outage += 1


def _created_meanwhile(exc: BaseException) -> bool:
    """Whether a schema creation failed because another process was creating it too."""
    text = str(exc).lower()
    return "already exists" in text or "duplicate key" in text or "unique constraint" in text


def open_engine(url: str) -> sqlalchemy.Engine:
    """A plain engine on the storage's database, for read-only queries on Optuna's tables.

    Opening an ``RDBStorage`` imports Alembic and checks the schema, which costs more than
    everything ``tuner status`` does together. No pool: a command that answers and exits.
    """
    parsed = parse_url(url)
    kwargs: dict[str, Any] = {"poolclass": sqlalchemy.pool.NullPool}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 60}
    try:
        return sqlalchemy.create_engine(parsed, **kwargs)
    except (sa_exc.ArgumentError, ImportError) as exc:
        raise unreachable(url, exc) from None


def unreachable(url: str, exc: BaseException) -> RuntimeFailure:
    """The one-line failure for a database that cannot be used, password masked."""
    text = _first_line(exc, parse_url(url).password)
    if "no password supplied" in text or "password authentication failed" in text:
        text += ("; give the password in the URL, in $PGPASSWORD or with "
                 "--storage-password-file")
    return RuntimeFailure(f"cannot open storage {mask(url)}: {text}")


def retry_interval(attempt: int) -> float:
    """Seconds to wait before the next try while the database is unreachable."""
    return min(0.5 * 2 ** attempt, 5.0)


def retry_on_disconnect(storage: RDBStorage, action: Callable[[], Any],
                        finished_by_earlier_try: Callable[[], bool] | None = None) -> Any:
    """Run ``action`` again from the start while the database is unreachable.

    The one retry loop: every storage call goes through it (:class:`ResilientRDBStorage`),
    and so do steps that must be redone as a whole (the budget check and the trial it
    creates). ``finished_by_earlier_try``: after an ``UpdateFinishedTrialError`` on a retry,
    whether the try before committed just before the connection dropped (success), rather
    than another worker finishing the trial meanwhile (the error stands).
    """
    deadline = time.monotonic() + settings.db_retry_seconds()
    attempt = 0
    while True:
        try:
            result = action()
        except optuna.exceptions.UpdateFinishedTrialError:
            if attempt and finished_by_earlier_try is not None \
                    and retry_on_disconnect(storage, finished_by_earlier_try):
                return True
            raise
        except (sa_exc.OperationalError, sa_exc.InterfaceError,
                optuna.exceptions.StorageInternalError) as exc:
            if not is_disconnect(exc):
                raise
            if time.monotonic() > deadline:
                raise DatabaseGone(
                    f"the database was unreachable for more than "
                    f"{settings.db_retry_seconds():g} s ($TUNER_DB_RETRY_SECONDS): "
                    f"{_first_line(exc, None)}") from exc
            if attempt == 0:
                _log.warning("database unreachable (%s); retrying", _first_line(exc, None))
            elif attempt % 10 == 0:
                _log.warning("database still unreachable after %d attempts; retrying", attempt)
            storage.engine.dispose()
            time.sleep(retry_interval(attempt))
            attempt += 1
            continue
        if attempt and isinstance(storage, ResilientRDBStorage):
            storage.last_recovered = time.monotonic()
        return result


class DatabaseGone(RuntimeFailure):
    """The database stayed unreachable past ``$TUNER_DB_RETRY_SECONDS``: the worker stops with
    one line (its running trial is retried via the heartbeat once the database is back)."""


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` means the database went away (worth waiting for), not a bad query."""
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    if isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated:
        return True
    if isinstance(cause, sa_exc.OperationalError | sa_exc.InterfaceError):
        text = str(cause).lower()
        return not any(s in text for s in ("does not exist", "authentication failed",
                                           "syntax error", "database is locked"))
    return False


class ResilientRDBStorage(RDBStorage):
    """Optuna's RDBStorage with every call retried across database outages.

    Every public method of :class:`~optuna.storages.RDBStorage` goes through
    :func:`retry_on_disconnect`, found by looking at the class rather than by a list of names,
    so a method a later Optuna adds is covered too; so do the private ones that Optuna's
    caching storage (``study._storage``) calls on it: the reads behind sampling and every
    pruner's look at the study, and the write behind ``suggest_*`` (which ignores a row an
    earlier try already committed), else a short outage failed the trial mid-training.
    Creating a trial is left out: the claim path redoes its whole decision instead.
    ``last_recovered`` (monotonic seconds) is when a call last succeeded after an outage.
    """

    last_recovered: float | None = None


def _retrying(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        call = getattr(RDBStorage, name)
        earlier = None
        if name == "set_trial_state_values":
            asked = inspect.signature(call).bind(self, *args, **kwargs).arguments

            def earlier() -> bool:  # our own write, or another worker's?
                found = RDBStorage.get_trial(self, asked["trial_id"])
                return found.state == asked["state"]

        return retry_on_disconnect(self, lambda: call(self, *args, **kwargs),
                                   finished_by_earlier_try=earlier)

    return wrapper


_CALLED_BY_THE_CACHE = ("_get_stale_trial_ids", "_get_trials", "_get_best_trial_id",
                        "_set_trial_param")
for _name, _member in inspect.getmembers(RDBStorage, inspect.isfunction):
    if not _name.startswith("_") or _name in _CALLED_BY_THE_CACHE:
        setattr(ResilientRDBStorage, _name, _retrying(_name, _member))


def _first_line(exc: BaseException, password: str | None) -> str:
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    cause = getattr(cause, "orig", None) or cause
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if password:
        text = text.replace(password, "***")
    return text


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Hide Optuna's experimental-feature warnings about heartbeats from users."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
