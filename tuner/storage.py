"""Storage URL → Optuna storage that survives a database restart and never leaks a password.

* The URL comes from ``--storage``, else ``$TUNER_STORAGE``, else ``sqlite:///tuner.db``. The
  password may sit in the URL, in ``$PGPASSWORD`` (libpq reads it) or in a file
  (``--storage-password-file``); :func:`mask` hides it wherever a URL is printed.
* Heartbeats (``$TUNER_HEARTBEAT_INTERVAL``, default 10 s; ``$TUNER_GRACE_PERIOD``, default
  30 s) let any worker fail a trial whose process died (:mod:`tuner.budget` does it).
* Every storage call is retried while the database is unreachable (up to
  ``$TUNER_DB_RETRY_SECONDS``, default 300 s); ``pool_pre_ping`` throws away pooled connections
  that died with the server. Each process holds at most ``POOL_SIZE + MAX_OVERFLOW`` connections.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from sqlalchemy import exc as sa_exc

from tuner.errors import RuntimeFailure, UserError

DEFAULT_URL = "sqlite:///tuner.db"
POOL_SIZE = 2
MAX_OVERFLOW = 2
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
        url = parse_url(url).set(password=password).render_as_string(hide_password=False)
    return url


def mask(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print or log)."""
    try:
        return parse_url(url).render_as_string(hide_password=True)
    except UserError:
        return _masked_text(url)


def open_storage(url: str, *, heartbeat: bool = True) -> RDBStorage:
    """Connect (creating Optuna's tables if needed); one-line :class:`RuntimeFailure` if not."""
    parsed = parse_url(url)
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
        }
    try:
        with _quiet_optuna():
            return ResilientRDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError,
            ValueError) as exc:
        raise unreachable(url, exc) from None


def default_artifacts(url: str) -> Path:
    """Where models are kept unless told: beside a SQLite file, else ./tuner-artifacts."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).resolve().parent / "tuner-artifacts"
    return Path.cwd() / "tuner-artifacts"


def artifacts_dir(override: str | None, recorded: str | None) -> Path:
    """``--artifacts``, else ``$TUNER_ARTIFACTS``, else the directory the study recorded."""
    chosen = override or os.environ.get("TUNER_ARTIFACTS") or recorded or "tuner-artifacts"
    return Path(chosen).expanduser()


def retry_interval(attempt: int) -> float:
    """Seconds to wait before the next try while the database is unreachable."""
    return min(0.5 * 2 ** attempt, 5.0)


def db_retry_seconds() -> int:
    """Seconds storage calls keep retrying an unreachable database."""
    return _env_int("TUNER_DB_RETRY_SECONDS", 300)


def _retrying(method: Callable[..., Any]) -> Callable[..., Any]:
    """Retry ``method`` while the database is unreachable, so a restart costs a wait only."""

    @functools.wraps(method)
    def wrapper(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + db_retry_seconds()
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
                if not is_disconnect(exc) or time.monotonic() > deadline:
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
    deadline = time.monotonic() + db_retry_seconds()
    attempt = 0
    while True:
        try:
            result = action()
        except (sa_exc.OperationalError, sa_exc.InterfaceError,
                optuna.exceptions.StorageInternalError) as exc:
            if not is_disconnect(exc) or time.monotonic() > deadline:
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
        raise RuntimeFailure(f"cannot open storage {mask(url)}: "
                             f"{_first_line(exc, parsed.password)}") from None


def unreachable(url: str, exc: BaseException) -> RuntimeFailure:
    """The one-line failure for a database that cannot be used, password masked."""
    return RuntimeFailure(f"cannot open storage {mask(url)}: "
                          f"{_first_line(exc, parse_url(url).password)}")


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


def is_disconnect(exc: BaseException) -> bool:
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    if isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated:
        return True
    if isinstance(cause, sa_exc.OperationalError | sa_exc.InterfaceError):
        text = str(cause).lower()
        return not any(s in text for s in ("does not exist", "authentication failed",
                                           "syntax error", "database is locked"))
    return False


def parse_url(url: str) -> sqlalchemy.engine.URL:
    """Parse a storage URL; anything wrong with it is the user's to fix (exit 2)."""
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
    return parsed


def _masked_text(url: str) -> str:
    """Mask a URL that may not even parse: everything between ``user:`` and the last ``@``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in credentials else ''}@{host}"


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
