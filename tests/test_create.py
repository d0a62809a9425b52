"""``tuner create`` ends with the worker command to run on the GPU nodes, ready to paste."""

from __future__ import annotations

import shlex
import time
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


def test_a_new_study_created_by_many_at_once_is_created_once(tmp_path: Path,
                                                              any_url: str) -> None:
    """Several `tuner run` or `tuner create` starting a new study together (a job array, pods):
    exactly one creates it, the others resume it and check their file against it, and none
    sees the study in the moment between its creation and its definition being stored."""
    import threading

    from tuner import study as studies
    from tuner.errors import UserError
    from tuner.spec import load_spec
    from tuner.storage import open_storage

    spec = load_spec(write_study(tmp_path, "together"))
    (tmp_path / "other").mkdir()
    other = load_spec(write_study(tmp_path / "other", "together", epochs=3))
    specs = [spec] * 5 + [other]
    gate = threading.Barrier(len(specs))
    outcomes: list[object] = [None] * len(specs)

    def create(i: int) -> None:
        storage = open_storage(any_url)
        gate.wait()
        try:
            outcomes[i] = studies.create_or_resume(specs[i], storage)[1]
        except UserError as exc:
            outcomes[i] = str(exc)
        finally:
            storage.engine.dispose()

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(specs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    created = [o for o in outcomes if o is True]
    refused = [o for o in outcomes if isinstance(o, str)]
    assert len(created) == 1, outcomes
    if outcomes[-1] is True:  # the other file won: every copy of the first is refused
        assert len(refused) == 5, outcomes
    else:
        assert refused == [outcomes[-1]] and "already exists with another" in refused[0], outcomes
    assert all(o is not None for o in outcomes), outcomes


def test_a_study_read_while_it_is_being_created_is_read_once_it_is(tmp_path: Path,
                                                                   any_url: str) -> None:
    """A worker that finds the study in the moment after its creation and before its
    definition is stored waits for the creator, which holds the claim lock meanwhile; a
    study that some other program made without a definition is refused in one line."""
    import threading

    import optuna
    import pytest

    from tuner import study as studies
    from tuner.budget import budget_lock
    from tuner.errors import UserError
    from tuner.spec import load_spec
    from tuner.storage import open_storage

    spec = load_spec(write_study(tmp_path, "slow"))
    storage = open_storage(any_url)
    created = threading.Event()

    def create_slowly() -> None:
        with budget_lock(storage, "slow"):
            study = optuna.create_study(study_name="slow", storage=storage)
            created.set()
            time.sleep(1.0)
            study.set_user_attr("spec", spec.to_dict())

    creator = threading.Thread(target=create_slowly)
    creator.start()
    assert created.wait(30)
    _, loaded = studies.load("slow", storage)
    creator.join(30)
    assert loaded == spec

    foreign = optuna.create_study(study_name="foreign", storage=storage)
    foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(UserError, match="'foreign' was not created by tuner"):
        studies.load("foreign", storage)
    storage.engine.dispose()


def test_a_creation_cut_short_is_finished_by_the_next_create(tmp_path: Path,
                                                              any_url: str) -> None:
    """`tuner create` killed between making the study and storing its definition leaves an
    empty study without one: workers say how to finish it, and `tuner create` does."""
    import optuna

    optuna.create_study(study_name="cut", storage=any_url)  # what the killed create left
    path = write_study(tmp_path, "cut")
    worker = cli("worker", "--study", "cut", "--storage", any_url, "--gpus", "none")
    assert worker.returncode == 2 and "was never fully created" in worker.stderr, worker.stderr
    created = cli("create", str(path), "--storage", any_url)
    assert created.returncode == 0 and "Created study 'cut'" in created.stdout, created
    assert optuna.load_study(study_name="cut", storage=any_url).user_attrs["spec"]["name"] \
        == "cut"


def test_two_runs_started_together_never_draw_the_same_configurations(tmp_path: Path,
                                                                     pg_url: str) -> None:
    """Two `tuner run` of one new seeded study, started together: each seeds its sampler by
    the first trial it creates, so they do not draw the same configurations in pairs (with the
    study's seed alone, both drew trial 0's configuration, then trial 2's, ...)."""
    import os
    import subprocess

    import optuna
    from conftest import TUNER

    path = write_study(tmp_path, "pair", n_trials=6, epochs=1, sampler="random", seed=0)
    env = {k: v for k, v in os.environ.items() if k != "TUNER_STORAGE"}
    runs = [subprocess.Popen([*TUNER, "run", str(path), "--storage", pg_url], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    trials = optuna.load_study(study_name="pair", storage=pg_url).trials
    configurations = {tuple(sorted(t.params.items())) for t in trials}
    assert len(trials) == 6 and len(configurations) == 6, [t.params for t in trials]
