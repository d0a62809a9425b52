"""Storage URL → Optuna storage that survives a database restart and never leaks a password.

* The URL comes from ``--storage``, else ``$TUNER_STORAGE``, else ``sqlite:///tuner.db``. The
  password may sit in the URL, in ``$PGPASSWORD`` (libpq reads it) or in a file
  (``--storage-password-file``); :func:`mask` hides it wherever a URL is printed.
* Heartbeats (``$TUNER_HEARTBEAT_INTERVAL``, default 10 s; ``$TUNER_GRACE_PERIOD``, default
  30 s) let any worker fail a trial whose process died; Optuna's
  ``RetryHeartbeatStaleTrialCallback`` queues its parameters again.
* Every storage call is retried while the database is unreachable (up to
  ``$TUNER_DB_RETRY_SECONDS``, default 300 s); ``pool_pre_ping`` throws away pooled connections
  that died with the server. Each process holds at most ``POOL_SIZE + MAX_OVERFLOW`` connections.
* :func:`budget_lock` serializes "is there budget left? then create a trial" across every
  worker on every node (a PostgreSQL transaction-level advisory lock, so it also works behind
  PgBouncer in transaction mode and dies with its connection; a file lock beside a SQLite
  file), which is how a study ends with exactly ``n_trials`` finished trials.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy import exc as sa_exc

from tuner.errors import RuntimeFailure, UserError

DEFAULT_URL = "sqlite:///tuner.db"
POOL_SIZE = 2
MAX_OVERFLOW = 2
MAX_RETRY = 3
_log = logging.getLogger("tuner.storage")


def resolve_url(url: str | None = None, password_file: str | None = None) -> str:
    """The storage URL from the flag, the environment or the default, password filled in."""
    url = url or os.environ.get("TUNER_STORAGE") or DEFAULT_URL
    if password_file:
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UserError(f"--storage-password-file: cannot read {password_file} "
                            f"({exc.strerror})") from None
        url = _parse(url).set(password=password).render_as_string(hide_password=False)
    return url


def mask(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print or log)."""
    try:
        return _parse(url).render_as_string(hide_password=True)
    except RuntimeFailure:
        return "<malformed storage URL>"


def open_storage(url: str, *, heartbeat: bool = True) -> RDBStorage:
    """Connect (creating Optuna's tables if needed); one-line :class:`RuntimeFailure` if not."""
    parsed = _parse(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs.update(pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_recycle=1800)
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {
            "heartbeat_interval": _env_int("TUNER_HEARTBEAT_INTERVAL", 10),
            "grace_period": _env_int("TUNER_GRACE_PERIOD", 30),
            "heartbeat_stale_trial_callback": RetryAfresh(max_retry=MAX_RETRY),
        }
    try:
        with _quiet_optuna():
            return ResilientRDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError,
            ValueError) as exc:
        raise RuntimeFailure(f"cannot open storage {mask(url)}: "
                             f"{_first_line(exc, parsed.password)}") from None


class RetryAfresh(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a dead trial's parameters, without the dead run's attributes.

    Optuna copies the user attributes into the retry; the host, GPU, pid and fail reason of
    the run that died would then be reported for the run that completes.
    """

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {}
        super().__call__(study, trial)


def default_artifacts(url: str) -> Path:
    """Where models are kept unless told: beside a SQLite file, else ./tuner-artifacts."""
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).resolve().parent / "tuner-artifacts"
    return Path.cwd() / "tuner-artifacts"


def artifacts_dir(override: str | None, recorded: str | None) -> Path:
    """``--artifacts``, else ``$TUNER_ARTIFACTS``, else the directory the study recorded."""
    chosen = override or os.environ.get("TUNER_ARTIFACTS") or recorded or "tuner-artifacts"
    return Path(chosen).expanduser()


def retry_interval(attempt: int) -> float:
    return min(0.5 * 2 ** attempt, 5.0)


def _retrying(method: Callable[..., Any]) -> Callable[..., Any]:
    """Retry ``method`` while the database is unreachable, so a restart costs a wait only."""

    @functools.wraps(method)
    def wrapper(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + _env_int("TUNER_DB_RETRY_SECONDS", 300)
        attempt = 0
        while True:
            try:
                result = method(self, *args, **kwargs)
            except optuna.exceptions.UpdateFinishedTrialError:
                if attempt and method.__name__ == "set_trial_state_values":
                    return True  # our earlier attempt committed before the connection dropped
                raise
            except (sa_exc.OperationalError, sa_exc.InterfaceError,
                    optuna.exceptions.StorageInternalError) as exc:
                if not _is_disconnect(exc) or time.monotonic() > deadline:
                    raise
                _wait_for_database(self, exc, attempt)
                attempt += 1
                continue
            if attempt:
                self.last_recovered = time.monotonic()
            return result

    return wrapper


def retry_on_disconnect(storage: RDBStorage, action: Callable[[], Any]) -> Any:
    """Run ``action`` (several storage calls) again from the start while the database is away.

    For steps that use the engine directly or must be redone as a whole (the budget check and
    the trial it creates), where retrying each call alone is not enough.
    """
    deadline = time.monotonic() + _env_int("TUNER_DB_RETRY_SECONDS", 300)
    attempt = 0
    while True:
        try:
            result = action()
        except (sa_exc.OperationalError, sa_exc.InterfaceError,
                optuna.exceptions.StorageInternalError) as exc:
            if not _is_disconnect(exc) or time.monotonic() > deadline:
                raise
            _wait_for_database(storage, exc, attempt)
            attempt += 1
            continue
        if attempt:
            storage.last_recovered = time.monotonic()  # type: ignore[attr-defined]
        return result


def _wait_for_database(storage: RDBStorage, exc: BaseException, attempt: int) -> None:
    if attempt == 0:
        _log.warning("database unreachable (%s); retrying", _first_line(exc, None))
    elif attempt % 10 == 0:
        _log.warning("database still unreachable after %d attempts; retrying", attempt)
    storage.engine.dispose()
    time.sleep(retry_interval(attempt))


class ResilientRDBStorage(RDBStorage):
    """Optuna's RDBStorage with every call retried across database outages.

    ``last_recovered`` (monotonic seconds) is when a call last succeeded after an outage.
    """

    last_recovered: float | None = None


for _name in ("create_new_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
              "get_study_user_attrs", "get_study_system_attrs", "get_trial_user_attrs",
              "get_trial_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
              "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
              "set_trial_user_attr", "set_trial_system_attr",
              "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials",
              "get_best_trial", "record_heartbeat", "_get_stale_trial_ids"):
    setattr(ResilientRDBStorage, _name, _retrying(getattr(RDBStorage, _name)))


def _is_disconnect(exc: BaseException) -> bool:
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    if isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated:
        return True
    if isinstance(cause, sa_exc.OperationalError | sa_exc.InterfaceError):
        text = str(cause).lower()
        return not any(s in text for s in ("does not exist", "authentication failed",
                                           "syntax error", "database is locked"))
    return False


@contextlib.contextmanager
def budget_lock(storage: RDBStorage, study_name: str) -> Iterator[None]:
    """Hold a lock shared by every process that uses this study's database."""
    url = storage.engine.url
    if url.get_backend_name() == "postgresql":
        key = zlib.crc32(f"tuner-budget:{study_name}".encode())
        deadline = time.monotonic() + _env_int("TUNER_DB_RETRY_SECONDS", 300)
        attempt = 0
        while True:
            try:
                conn = storage.engine.connect()
                conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
                break
            except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
                if not _is_disconnect(exc) or time.monotonic() > deadline:
                    raise
                storage.engine.dispose()
                time.sleep(retry_interval(attempt))
                attempt += 1
        try:
            yield
        finally:
            try:
                conn.commit()  # ends the transaction, which releases the lock
            except sa_exc.SQLAlchemyError:
                pass  # the server went away: the lock went with the session
            finally:
                conn.close()
    elif url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        with open(f"{url.database}.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        yield  # other databases: best effort, MaxTrials-style accounting only


def _parse(url: str) -> sqlalchemy.engine.URL:
    try:
        return sqlalchemy.engine.make_url(url)
    except sa_exc.ArgumentError:
        raise RuntimeFailure("malformed storage URL: expected e.g. sqlite:///tuner.db or "
                             "postgresql+psycopg2://user@host:5432/dbname") from None


def _first_line(exc: BaseException, password: str | None) -> str:
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    cause = getattr(cause, "orig", None) or cause
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if password:
        text = text.replace(password, "***")
    return text


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"${name}: expected a whole number of seconds, got {value!r}") from None


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Hide Optuna's experimental-feature warnings about heartbeats from users."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
