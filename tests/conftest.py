"""Shared fixtures: a fresh database per test on the real PostgreSQL, tiny study files, and
the real ``tuner`` command, in this process (:func:`cli`) or in a subprocess (:func:`run_tuner`,
for signals, exit codes and what a terminal shows).

``TUNER_TEST_DATABASE_URL`` points at the server (default: postgres on 127.0.0.1:5432, trust
auth). Every test that asks for ``pg_url`` gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy

SERVER_URL = os.environ.get("TUNER_TEST_DATABASE_URL",
                            "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parents[1]
TUNER = [sys.executable, "-m", "tuner"]


def _admin_engine() -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(SERVER_URL, isolation_level="AUTOCOMMIT",
                                    poolclass=sqlalchemy.pool.NullPool)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL to a brand-new PostgreSQL database, dropped (connections and all) after the test."""
    name = f"tuner_test_{uuid.uuid4().hex[:12]}"
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


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tuner.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both storages the README promises: the embedded SQLite file and the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tuner.db'}"
    return request.getfixturevalue("pg_url")


def write_study(directory: Path, name: str = "tiny", *, n_trials: int = 3, epochs: int = 2,
                family: str = "mlp", pruner: str = "none", sampler: str = "random",
                source: str = "digits", extra_search: str = "", limit: int | None = 400,
                dropout: str = "[0.0, 0.5]", l2: str = "[1e-6, 1e-2]",
                augment: str = "[0.0, 0.5]", seed: int | None = 0, patience: int = 3,
                extra_study: str = "") -> Path:
    """A small, fast study file (digits cut to ``limit`` images, 2 epochs)."""
    seed_line = f"seed = {seed}" if seed is not None else ""
    limit_line = f"limit = {limit}" if limit is not None else ""
    text = textwrap.dedent(f"""\
        [study]
        name = "{name}"
        n_trials = {n_trials}
        sampler = "{sampler}"
        pruner = "{pruner}"
        {seed_line}
        {extra_study}

        [data]
        source = "{source}"
        validation_split = 0.25
        {limit_line}

        [model]
        family = "{family}"
        epochs = {epochs}
        batch_size = 64
        patience = {patience}

        [search]
        dropout = {dropout}
        l2 = {l2}
        augment = {augment}
        {extra_search}
        """)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def fake_nvidia_smi(bin_dir: Path, gpus: int) -> Path:
    """``bin_dir`` with an ``nvidia-smi`` that lists ``gpus`` GPUs as the driver's does (the
    machines tests run on have none), and tells on its callers (``called`` appears beside it)."""
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08x}-0000-0000-0000)\\n"
                    for i in range(gpus))
    smi.write_text(f"#!/bin/sh\necho \"$*\" >> '{bin_dir}/called'\nprintf '{lines}'\n")
    smi.chmod(0o755)
    return bin_dir


def run_tuner(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real ``tuner`` command (``python -m tuner``) in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("TUNER_STORAGE", None) if env is None or "TUNER_STORAGE" not in env else None
    return subprocess.run([*TUNER, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@dataclass(frozen=True)
class Ran:
    """What a command did: like ``subprocess.CompletedProcess``, for :func:`cli`."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Ran:
    """``tuner ARGS`` run in this process by ``tuner.cli.main`` with captured streams: the same
    code path as the command, without a Python start-up per call."""
    from tuner.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        if env is None or "TUNER_STORAGE" not in env:
            os.environ.pop("TUNER_STORAGE", None)
        os.environ.update(env or {})
        code = main(list(args), out=out, err=err)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return Ran(int(code), out.getvalue(), err.getvalue())
