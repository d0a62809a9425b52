"""Every setting that comes from the environment, and which source wins.

=====================================  ==========================================================
setting                                precedence (first given wins)
=====================================  ==========================================================
storage URL                            ``--storage``, ``$TUNER_STORAGE``, ``sqlite:///tuner.db``;
                                       password from ``--storage-password-file``,
                                       ``$TUNER_STORAGE_PASSWORD_FILE``, the URL or ``$PGPASSWORD``
artifact directory (saved models)      ``--artifacts``, ``$TUNER_ARTIFACTS``, the directory the
                                       study recorded when created, beside a SQLite file, else
                                       ``./tuner-artifacts``
heartbeat interval / grace period      ``$TUNER_HEARTBEAT_INTERVAL`` (10 s),
                                       ``$TUNER_GRACE_PERIOD`` (30 s)
database retries                       ``$TUNER_DB_RETRY_SECONDS`` (300 s)
dashboard figure updates               at most one per ``$TUNER_FIGURE_INTERVAL`` (30 s) per
                                       study, or per 50 times the last update's processor
                                       time if longer; and one when a worker stops
exit status of a worker stopped by a   ``$TUNER_SIGNAL_EXIT_CODE`` (0)
signal, its trials given back
=====================================  ==========================================================
"""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

from tuner.errors import UserError
from tuner.urls import parse_url, with_password

DEFAULT_STORAGE = "sqlite:///tuner.db"
DEFAULT_ARTIFACTS = "tuner-artifacts"


def storage_url(flag: str | None = None, password_file: str | None = None) -> str:
    """The storage URL, its password filled in from a file if one is named."""
    url = flag or os.environ.get("TUNER_STORAGE") or DEFAULT_STORAGE
    try:
        url = _with_driver(url)
    except UserError as exc:
        if flag:
            raise
        raise UserError(f"$TUNER_STORAGE: {exc}") from None
    source = "--storage-password-file"
    if not password_file and os.environ.get("TUNER_STORAGE_PASSWORD_FILE"):
        password_file, source = (os.environ["TUNER_STORAGE_PASSWORD_FILE"],
                                 "$TUNER_STORAGE_PASSWORD_FILE")
    if password_file:
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UserError(f"{source}: cannot read {password_file} "
                            f"({exc.strerror})") from None
        url = with_password(url, password)
    return url


def _with_driver(url: str) -> str:
    """``postgresql://`` and ``postgres://`` URLs with the driver tuner installs (psycopg2);
    a URL tuner cannot use (another database, a driver not installed, an SQLite file that
    cannot be) refused in one line.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3, which tuner does not install,
    and does not know ``postgres://`` (the form many hosting services hand out). A URL that
    names its driver is left alone, and so is a bare one where psycopg 3 is installed.
    """
    parsed = parse_url(url)
    if parsed.drivername == "postgres" or (parsed.drivername == "postgresql"
                                           and importlib.util.find_spec("psycopg") is None):
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(
            hide_password=False)
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        # The claim path's lock and tuner's own queries are written for these two.
        raise UserError(f"storage URL: {parsed.get_backend_name()} is not supported; use "
                        "PostgreSQL (postgresql+psycopg2://user@host:5432/dbname) or, on one "
                        "machine, SQLite (sqlite:///tuner.db)")
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError:  # postgresql+psycopg (3), +pg8000, +asyncpg: not what tuner installs
        raise UserError(f"storage URL: the driver {parsed.drivername!r} is not installed; "
                        "use postgresql+psycopg2://user@host:5432/dbname (or postgresql://), "
                        "which tuner installs") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        _check_sqlite_file(Path(parsed.database).expanduser())
    return url


def _check_sqlite_file(path: Path) -> None:
    """SQLite says only "unable to open database file" for a folder or a missing folder."""
    if path.is_dir():
        raise UserError(f"storage URL: {path} is a folder; name a database file in it, "
                        f"as in sqlite:///{path / 'tuner.db'}")
    if not path.parent.is_dir():
        absolute = Path("/") / path
        if not path.is_absolute() and absolute.parent.is_dir():  # sqlite:///tmp/x.db
            raise UserError(f"storage URL: the folder {path.parent} does not exist here; for "
                            f"{absolute} write four slashes: sqlite:///{absolute}")
        raise UserError(f"storage URL: the folder {path.parent} does not exist; create it "
                        "or name a database file in a folder that does")


def artifacts_dir(flag: str | None = None, recorded: str | None = None,
                  url: str | None = None) -> Path:
    """Where saved models live (see the module docstring for the order)."""
    chosen = flag or os.environ.get("TUNER_ARTIFACTS") or recorded
    if chosen:
        return Path(chosen).expanduser()
    if url is not None:
        parsed = parse_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "",
                                                                             ":memory:"):
            return Path(parsed.database).resolve().parent / DEFAULT_ARTIFACTS
    return Path.cwd() / DEFAULT_ARTIFACTS


def heartbeat_interval() -> int:
    return _seconds("TUNER_HEARTBEAT_INTERVAL", 10)


def grace_period() -> int:
    return _seconds("TUNER_GRACE_PERIOD", 30)


def db_retry_seconds() -> int:
    """How long storage calls keep retrying an unreachable database."""
    return _seconds("TUNER_DB_RETRY_SECONDS", 300)


def epoch_write_interval() -> int:
    """Seconds a running trial's epochs are gathered before they are written (0: each epoch)."""
    return _seconds("TUNER_EPOCH_WRITE_INTERVAL", 1)


def figure_interval() -> int:
    """Seconds between two updates of a study's dashboard figures (0: after every trial)."""
    return _seconds("TUNER_FIGURE_INTERVAL", 30)


def quiet_libraries() -> None:
    """Library chatter that means nothing to a user: TensorFlow's C++ log, experimental-API
    and deprecation warnings of Optuna, Keras' note on ``shuffle``; Optuna's INFO lines."""
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"optuna(\..*)?$")
    warnings.filterwarnings("ignore", message=r".*Heartbeat of storage.*")
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed.*")
    warnings.filterwarnings("ignore", message=r".*is experimental.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


# What stops a worker cleanly (its running trials given back): SIGTERM from a scheduler,
# Ctrl-C, and SIGHUP from a terminal or ssh session that closes.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def signal_exit_code() -> int:
    """The exit status of a worker stopped by SIGTERM or Ctrl-C once its trials are given back
    (``$TUNER_SIGNAL_EXIT_CODE``, default 0). A scheduler that replaces only failed workers
    (Kubernetes' pod failure policy for evicted pods) needs one that is not 0."""
    value = os.environ.get("TUNER_SIGNAL_EXIT_CODE")
    try:
        code = int(value) if value else 0
    except ValueError:
        code = -1
    if not 0 <= code <= 255:
        raise UserError(f"$TUNER_SIGNAL_EXIT_CODE: expected an exit status 0-255, got {value!r}")
    return code


def _seconds(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"${name}: expected a whole number of seconds, got {value!r}") from None
