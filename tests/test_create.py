"""``tuner create`` ends with the worker command to run on the GPU nodes, ready to paste."""

from __future__ import annotations

import shlex
from pathlib import Path

import sqlalchemy
from conftest import cli, write_study

PREFIX = "Start workers with: "


def worker_line(out: str) -> list[str]:
    line = out.strip().splitlines()[-1]
    assert line.startswith(PREFIX), out
    return shlex.split(line.removeprefix(PREFIX))


def test_a_relative_sqlite_path_is_made_absolute(tmp_path: Path) -> None:
    path = write_study(tmp_path, "paste")
    result = cli("create", str(path), "--storage", "sqlite:///here.db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert worker_line(result.stdout) == [
        "tuner", "worker", "--study", "paste", "--storage", f"sqlite:///{tmp_path}/here.db",
        "--gpus", "all"]


def test_the_password_is_never_printed_and_the_pasted_flags_work(tmp_path: Path,
                                                                 pg_url: str) -> None:
    """A worker reads the password from a file; the rest of the URL is the one given."""
    with_password = sqlalchemy.engine.make_url(pg_url).set(password="s3cret-pw")
    url = with_password.render_as_string(hide_password=False)
    path = write_study(tmp_path, "paste")
    result = cli("create", str(path), "--storage", url)
    assert result.returncode == 0, result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    argv = worker_line(result.stdout)
    assert argv[:4] == ["tuner", "worker", "--study", "paste"]
    assert argv[-4:] == ["--storage-password-file", "FILE", "--gpus", "all"]
    secret = tmp_path / "password"
    secret.write_text("s3cret-pw\n")
    storage = argv[argv.index("--storage") + 1]
    status = cli("status", "--study", "paste", "--storage", storage,
                 "--storage-password-file", str(secret))
    assert status.returncode == 0, status.stderr
