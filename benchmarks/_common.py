"""Shared pieces of the benchmark scripts: flags, a throwaway PostgreSQL database, study files,
tables and JSON output, and a description of the machine the numbers came from.

Every script takes ``--quick`` (smallest size, what CI runs so the scripts cannot rot) and
``--out DIR`` (default ``benchmarks/out``). ``$TUNER_BENCH_DATABASE_URL`` names the server
(default: ``postgres`` on 127.0.0.1:5432, trust auth); each script creates its own database and
drops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
SERVER_URL = os.environ.get("TUNER_BENCH_DATABASE_URL",
                            "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
# Same space as studies/digits_demo.toml: the search every comparison runs.
DEMO_SEARCH = {"dropout": "[0.0, 0.6]", "l2": "[1e-6, 1e-1]", "augment": "[0.0, 0.6]",
               "learning_rate": "[3e-4, 3e-3]"}


def parse_args(doc: str | None, extra: Any = None) -> argparse.Namespace:
    """``--quick`` and ``--out`` for every script (``extra(parser)`` adds its own flags)."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smallest size: checks the script works, numbers mean little")
    parser.add_argument("--out", type=Path, default=HERE / "out",
                        help="directory for the JSON result (default benchmarks/out)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message=r".*is experimental.*")
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def _admin_engine() -> Any:
    import sqlalchemy

    return sqlalchemy.create_engine(SERVER_URL, isolation_level="AUTOCOMMIT",
                                    poolclass=sqlalchemy.pool.NullPool)


@contextlib.contextmanager
def throwaway_database(prefix: str = "tuner_bench") -> Iterator[str]:
    """A URL to a new PostgreSQL database, dropped (connections and all) afterwards."""
    import sqlalchemy

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = _admin_engine()
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = sqlalchemy.engine.make_url(SERVER_URL).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def database_counters(url: str) -> dict[str, int]:
    """Server-side counters of one database: committed transactions, rows written, backends."""
    import sqlalchemy

    db = sqlalchemy.engine.make_url(url).database
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_stat_clear_snapshot()"))
            row = conn.execute(sqlalchemy.text(
                "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted, numbackends "
                "FROM pg_stat_database WHERE datname = :d"), {"d": db}).one()
    finally:
        engine.dispose()
    return {"xact_commit": int(row[0]), "rows_written": int(row[1]), "backends": int(row[2])}


def study_file(directory: Path, name: str, *, n_trials: int, epochs: int,
               pruner: str = "none", sampler: str = "tpe", seed: int | None = 0,
               patience: int = 5, batch_size: int = 64, limit: int | None = None,
               family: str = "mlp", search: dict[str, str] | None = None,
               test_split: float | None = None) -> Path:
    """A study file on the digits data (every knob a range, or a single number = fixed)."""
    search = search or DEMO_SEARCH
    lines = "\n".join(f"{k} = {v}" for k, v in search.items())
    text = textwrap.dedent(f"""\
        [study]
        name = "{name}"
        n_trials = {n_trials}
        sampler = "{sampler}"
        pruner = "{pruner}"
        {f"seed = {seed}" if seed is not None else ""}

        [data]
        source = "digits"
        validation_split = 0.25
        {f"limit = {limit}" if limit is not None else ""}
        {f"test_split = {test_split}" if test_split else ""}

        [model]
        family = "{family}"
        epochs = {epochs}
        batch_size = {batch_size}
        patience = {patience}

        [search]
        """) + lines + "\nflip = false\n"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def tuner_cli(*args: str, cwd: Path | None = None, timeout: float = 1800,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``tuner`` command (``python -m tuner``); raises with its output if it fails."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([PY, "-m", "tuner", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"tuner {' '.join(args[:1])} exited {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def has_worker_verb() -> bool:
    """Whether ``tuner worker`` (the supervisor) is available in this checkout."""
    import importlib.util

    return importlib.util.find_spec("tuner.supervisor") is not None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (0 for one value), min and max."""
    values = list(values)
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (prints readably and pastes into RESULTS.md as is)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """The hardware and library versions a result was measured with."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem_gib = round(kb / 2**20, 1)
    versions = {}
    for pkg in ("tensorflow", "keras", "optuna", "sqlalchemy", "psycopg2-binary", "keras-tuner"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": mem_gib,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average": list(os.getloadavg()), "versions": versions}


def write_result(args: Any, name: str, result: dict[str, Any], tables: list[str]) -> Path:
    """Print the tables and write ``OUT/NAME.json`` (with the machine and the command)."""
    result = {"benchmark": name, "quick": bool(args.quick),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
              **result, "tables": tables}
    path = Path(args.out) / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    for t in tables:
        print(t, end="\n\n")
    print(f"wrote {path}")
    return path
