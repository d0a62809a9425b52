"""Faults a night of GPU workers must survive, each with real `tuner worker` processes and the
real PostgreSQL: kill -9 of a child and of a whole worker, SIGTERM and Ctrl-C, a database
restart, trials that raise, eight workers on one study, and passwords that never show.

Heartbeats are fast here (interval 1 s, grace 3 s) so dead trials are noticed quickly. The
numbers a closing note needs are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import TUNER, run_tuner, write_study

from tuner.budget import LOST_LOCK

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
FAST_HEARTBEAT = {"TUNER_HEARTBEAT_INTERVAL": "1", "TUNER_GRACE_PERIOD": "3",
                  "PYTHONPATH": str(TESTS)}


class Worker:
    """A `tuner worker` in its own process group (a "node"), output kept in files."""

    def __init__(self, tmp: Path, name: str, *args: str, env: dict[str, str] | None = None,
                 storage: str | None = None) -> None:
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **FAST_HEARTBEAT, **(env or {})}
        if storage is not None:
            full_env["TUNER_STORAGE"] = storage
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([*TUNER, "worker", *args], stdout=out, stderr=err,
                                         env=full_env, start_new_session=True, text=True)

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"worker still running after {timeout}s:\n{self.stdout}\n{self.stderr}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.kill()


def _storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; none while the study does not exist yet."""
    try:
        storage = _storage(url)
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
        return []  # the tuner under test is creating Optuna's tables right now
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []
    finally:
        storage.engine.dispose()


def _wait_for(what: str, check: Callable[[], object], timeout: float = 180,
              workers: list[Worker] | None = None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for w in workers or []:
            if w.proc.poll() is not None:
                pytest.fail(f"worker exited ({w.proc.returncode}) while waiting for {what}:\n"
                            f"{w.stdout}\n{w.stderr}")
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def _running_with_pid(url: str, name: str,
                      pid: int | None = None) -> optuna.trial.FrozenTrial | None:
    running = [t for t in _trials(url, name) if t.state.name == "RUNNING"
               and "pid" in t.user_attrs and pid in (None, t.user_attrs["pid"])]
    return running[0] if running else None


def _assert_budget_exact(url: str, name: str, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    trials = _trials(url, name)
    states = [t.state.name for t in trials]
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == n_trials, states
    assert "RUNNING" not in states and "WAITING" not in states, states
    assert len({t.number for t in trials}) == len(trials)
    return trials


def _assert_retried(trials: list[optuna.trial.FrozenTrial], failed_number: int) -> None:
    """The failed trial's parameters were run again (Optuna's retry records where from)."""
    failed = next(t for t in trials if t.number == failed_number)
    assert failed.state.name == "FAIL"
    origin = failed.system_attrs.get("failed_trial", failed.number)  # first of a retry chain
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == origin
               and t.number > failed.number and t.state.name in ("COMPLETE", "PRUNED")]
    assert len(retries) == 1
    # the same parameters (a trial stopped while sampling had only some of them yet)
    assert failed.params.items() <= retries[0].params.items()
    assert "fail_reason" not in retries[0].user_attrs  # the dead run's attributes stay behind


def _create(tmp: Path, url: str, name: str, **kw: object) -> None:
    path = write_study(tmp, name, **kw)  # type: ignore[arg-type]
    result = run_tuner("create", str(path), "--storage", url, cwd=tmp)
    assert result.returncode == 0, result.stderr


def test_kill_9_of_a_child_mid_trial(tmp_path: Path, pg_url: str,
                                     workers: list[Worker]) -> None:
    # "slow" sleeps in each step, so a trial lasts ~3 s on any machine: long enough to be seen.
    _create(tmp_path, pg_url, "kill-child", n_trials=2, epochs=10, patience=10,
            family="user_models:slow")
    worker = Worker(tmp_path, "w", "--study", "kill-child", "--gpus", "0", storage=pg_url)
    workers.append(worker)
    victim = _wait_for("a running trial", lambda: _running_with_pid(pg_url, "kill-child"),
                       workers=workers)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    killed_at = time.time()
    failed = _wait_for("the killed trial to be failed", lambda: next(
        (t for t in _trials(pg_url, "kill-child")
         if t.number == victim.number and t.state.name == "FAIL"), None))
    running_for = failed.datetime_complete.timestamp() - killed_at
    # judged dead once silent for the grace period (3 s, its last beat up to 1 s before the
    # kill), not before, and not long after
    assert 1.5 <= running_for < 30, running_for
    assert worker.wait() == 0, worker.stderr
    out = worker.stdout
    assert "[gpu0] process" in out and "was killed by SIGKILL; restarting" in out, out
    trials = _assert_budget_exact(pg_url, "kill-child", 2)
    _assert_retried(trials, victim.number)
    assert victim.user_attrs["gpu"] == "0"
    print(f"\n[kill -9 child] trial {victim.number} stayed RUNNING {running_for:.1f}s after "
          f"the kill (heartbeat 1s, grace 3s), then failed and retried; "
          f"{len(trials)} trials, 2 finished of budget 2")


def test_kill_9_of_a_whole_worker_while_another_goes_on(tmp_path: Path, pg_url: str,
                                                        workers: list[Worker]) -> None:
    _create(tmp_path, pg_url, "kill-node", n_trials=4, epochs=10, patience=10,
            family="user_models:slow")
    node_a = Worker(tmp_path, "a", "--study", "kill-node", "--gpus", "none", storage=pg_url)
    node_b = Worker(tmp_path, "b", "--study", "kill-node", "--gpus", "none", storage=pg_url)
    workers += [node_a, node_b]
    _wait_for("a running trial on each node", lambda: len({
        t.user_attrs["pid"] for t in _trials(pg_url, "kill-node")
        if t.state.name == "RUNNING" and "pid" in t.user_attrs}) == 2, workers=workers)
    a_child = int(re.search(r"\[cpu\] started process (\d+)", node_a.stdout).group(1))
    victim = _running_with_pid(pg_url, "kill-node", pid=a_child)
    assert victim is not None
    node_a.kill()  # the whole process group: supervisor and child, like a node losing power
    killed_at = time.time()
    failed = _wait_for("node A's trial to be failed", lambda: next(
        (t for t in _trials(pg_url, "kill-node")
         if t.number == victim.number and t.state.name == "FAIL"), None), workers=[node_b])
    assert 1.5 <= failed.datetime_complete.timestamp() - killed_at < 30
    assert node_b.wait() == 0, node_b.stderr
    trials = _assert_budget_exact(pg_url, "kill-node", 4)
    _assert_retried(trials, victim.number)
    print(f"\n[kill -9 worker] node A's trial {victim.number} stayed RUNNING "
          f"{failed.datetime_complete.timestamp() - killed_at:.1f}s after the kill (heartbeat "
          f"1s, grace 3s); node B, busy with its own trial, failed it and retried its "
          f"parameters, and finished the study: "
          f"{sum(t.state.name == 'COMPLETE' for t in trials)} of 4 complete, none RUNNING")


def test_sigterm_and_ctrl_c_give_the_trial_back(tmp_path: Path, pg_url: str,
                                                workers: list[Worker]) -> None:
    # Long enough (5-10 s: validation is one batch of the small data) that the signal lands
    # while the trial trains, even when the test's poll for it is slow on a loaded machine.
    _create(tmp_path, pg_url, "stop", n_trials=2, epochs=400, patience=100,
            family="user_models:tiny")
    given_back = []
    for how in ("SIGTERM to the worker", "Ctrl-C to its process group",
                "SIGHUP to its process group"):  # the terminal or ssh session closed
        # As on Kubernetes, where an evicted pod must fail to be replaced (worker-job.yaml)
        exit_code = 143 if how.startswith("SIGTERM") else 0
        worker = Worker(tmp_path, how[:7], "--study", "stop", "--gpus", "none", storage=pg_url,
                        env={"TUNER_SIGNAL_EXIT_CODE": str(exit_code)} if exit_code else None)
        workers.append(worker)
        victim = _wait_for("a running trial", lambda: _running_with_pid(pg_url, "stop"),
                           workers=[worker])
        sent = time.monotonic()
        if how.startswith("SIGTERM"):
            worker.proc.send_signal(signal.SIGTERM)
        elif how.startswith("SIGHUP"):
            os.killpg(worker.proc.pid, signal.SIGHUP)
        else:
            os.killpg(worker.proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        assert worker.wait(timeout=60) == exit_code, worker.stderr
        took = time.monotonic() - sent
        assert "Stopped: the running trials were given back" in worker.stdout
        assert "Traceback" not in worker.stderr, worker.stderr
        failed = next(t for t in _trials(pg_url, "stop") if t.number == victim.number)
        assert failed.state.name == "FAIL" and failed.user_attrs["fail_reason"] == "interrupted", \
            (failed.state.name, worker.stdout, worker.stderr)
        given_back.append(victim.number)
        print(f"\n[{how}] trial {victim.number} given back, worker exited {exit_code} in "
              f"{took:.1f}s")
    worker = Worker(tmp_path, "last", "--study", "stop", "--gpus", "none", storage=pg_url)
    workers.append(worker)
    assert worker.wait() == 0, worker.stderr
    trials = _assert_budget_exact(pg_url, "stop", 2)
    for number in given_back:
        _assert_retried(trials, number)


def test_a_child_killed_while_stopping_is_not_said_to_have_given_its_trial_back(
        tmp_path: Path, pg_url: str, workers: list[Worker]) -> None:
    """A child stuck in a native call cannot stop at a batch's end; a second SIGTERM kills it
    at once, and the worker says so rather than that its trial was given back."""
    _create(tmp_path, pg_url, "stuck", n_trials=1, epochs=3, family="user_models:hangs")
    marker = tmp_path / "stuck"
    worker = Worker(tmp_path, "w", "--study", "stuck", "--gpus", "none", storage=pg_url,
                    env={"STUCK_MARKER": str(marker)})
    workers.append(worker)
    _wait_for("a trial stuck in its first step", marker.exists, workers=[worker])
    worker.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.stderr
    assert "Stopped: 1 process was killed before giving a running trial back" in worker.stdout, \
        worker.stdout
    assert "given back;" not in worker.stdout
    assert [t.state.name for t in _trials(pg_url, "stuck")] == ["RUNNING"]  # until a sweep


def test_a_child_that_crashes_every_time_is_given_up_after_five_restarts(
        tmp_path: Path, pg_url: str, workers: list[Worker]) -> None:
    """The README's failure table: restarted after 1, 2, 4, 8, 16 s, then given up with one
    line and exit 1. Each crash's trial is failed by the heartbeat and its parameters retried
    at most 3 times; nothing is left queued for ever (74 s)."""
    _create(tmp_path, pg_url, "segv", n_trials=3, epochs=1, family="user_models:crashes")
    worker = Worker(tmp_path, "w", "--study", "segv", "--gpus", "none", storage=pg_url)
    workers.append(worker)
    assert worker.wait(timeout=300) == 1, worker.stdout + worker.stderr
    pauses = re.findall(r"killed by SIGSEGV; restarting in (\d+)s \(restart (\d) of 5\)",
                        worker.stdout)
    assert pauses == [("1", "1"), ("2", "2"), ("4", "3"), ("8", "4"), ("16", "5")], \
        worker.stdout
    assert worker.stderr.strip().splitlines()[-1] == \
        "tuner: error: [cpu] process was killed by SIGSEGV 6 times in a row; not restarting it"
    assert "Traceback" not in worker.stderr
    trials = _trials(pg_url, "segv")
    assert sum(t.state.name == "COMPLETE" for t in trials) == 0
    # a configuration that kills its worker every time is dropped after 3 retries
    first = [t for t in trials if t.params == trials[0].params]
    assert len(first) <= 4


def test_trials_that_raise_are_recorded_and_a_failing_worker_stops(
        tmp_path: Path, pg_url: str, workers: list[Worker]) -> None:
    _create(tmp_path, pg_url, "broken", n_trials=10, epochs=1, family="user_models:broken")
    # A NaN loss: Adam with learning_rate = 1e6 only reaches losses near 1e13 (its steps are
    # bounded by the learning rate), so a model whose output is NaN stands in for divergence.
    _create(tmp_path, pg_url, "nan", n_trials=10, epochs=1, family="user_models:diverges")
    for name, error in (("broken", "ValueError: layer sizes do not fit"),
                        ("nan", "loss became nan")):
        worker = Worker(tmp_path, name, "--study", name, "--gpus", "none", storage=pg_url)
        workers.append(worker)
        assert worker.wait() == 1, worker.stdout + worker.stderr
        last = worker.stderr.strip().splitlines()[-1]
        assert last.startswith("tuner: error: [cpu] 5 trials in a row failed, stopping this "
                               "worker; last error: "), last
        assert error in last.lower() if name == "nan" else error in last
        assert "Traceback" not in worker.stderr
        assert "restarting" not in worker.stdout  # a failing study is not retried for ever
        trials = _trials(pg_url, name)
        assert [t.state.name for t in trials] == ["FAIL"] * 5
        assert all(error in t.user_attrs["fail_reason"].lower() for t in trials) \
            if name == "nan" else all(error in t.user_attrs["fail_reason"] for t in trials)
        print(f"\n[{name}] {last}")


def test_eight_workers_share_one_budget(tmp_path: Path, pg_url: str,
                                        workers: list[Worker]) -> None:
    n_trials = 12
    _create(tmp_path, pg_url, "eight", n_trials=n_trials, epochs=1, limit=120,
            family="user_models:tiny")
    database = sqlalchemy.engine.make_url(pg_url).database
    peak, stop = [0], threading.Event()

    def watch() -> None:
        engine = sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.pool.NullPool)
        query = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d "
                                "AND pid <> pg_backend_pid()")
        while not stop.is_set():
            with engine.connect() as conn:
                peak[0] = max(peak[0], conn.execute(query, {"d": database}).scalar_one())
            stop.wait(0.2)
        engine.dispose()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    for i in range(8):
        workers.append(Worker(tmp_path, f"w{i}", "--study", "eight", "--gpus", "none",
                              storage=pg_url))
    codes = [w.wait(timeout=400) for w in workers]
    stop.set()
    watcher.join()
    outputs = "".join(w.stdout + w.stderr for w in workers)
    assert codes == [0] * 8, outputs
    assert "too many connections" not in outputs
    trials = _assert_budget_exact(pg_url, "eight", n_trials)
    per_worker = [sum(line.startswith("[cpu] trial") for line in w.stdout.splitlines())
                  for w in workers]
    assert sum(per_worker) == len(trials)
    # README, "Database connections": at most 4 a trial process, a parent's one at its start
    assert 8 <= peak[0] <= 8 * 4 + 8, f"peak connections {peak[0]}"
    print(f"\n[8 workers] {sum(t.state.name == 'COMPLETE' for t in trials)} finished of a "
          f"budget of {n_trials}, {len(trials)} trials in all, numbers "
          f"{sorted(t.number for t in trials)}; trials per worker {per_worker}; peak "
          f"connections to the study's database {peak[0]} (8 worker processes); "
          f"{time.monotonic() - started:.0f}s")


# --- PostgreSQL restarted in the middle of a study (a private cluster, not the shared one) ---

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                          text=True, timeout=120, check=True)


def _pg_ctl(data: Path, port: int, action: str) -> None:
    """``pg_ctl start`` (on the cluster's own port and socket directory) or a fast ``stop``."""
    args = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-w"]
    if action == "stop":
        args += ["-m", "fast"]
    else:
        args += ["-l", str(data.parent / "log"), "-o", f"-p {port} -k {data.parent} "
                 "-c listen_addresses=127.0.0.1 -c fsync=off"]
    _as_postgres(*args, action)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _private_cluster(root: Path, superuser_password: str | None = None
                     ) -> Iterator[tuple[str, Path, int]]:
    """A throw-away PostgreSQL cluster on a port of its own; with ``superuser_password``, TCP
    connections must give their role's password (scram-sha-256), as on a real server."""
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.skip("needs PostgreSQL 15 server binaries and runuser")
    os.chmod(root, 0o777)
    for parent in root.parents:  # postgres must be able to reach its data directory
        if str(parent).startswith("/tmp/"):
            os.chmod(parent, os.stat(parent).st_mode | 0o711)
    data, port = root / "data", _free_port()
    auth = ["-A", "trust"]
    if superuser_password is not None:
        (root / "pwfile").write_text(superuser_password + "\n")
        auth = ["--auth-local", "trust", "--auth-host", "scram-sha-256",
                f"--pwfile={root / 'pwfile'}"]
    _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), *auth, "-U", "postgres",
                 "--no-sync")
    _pg_ctl(data, port, "start")
    login = "postgres" if superuser_password is None else f"postgres:{superuser_password}"
    engine = sqlalchemy.create_engine(f"postgresql+psycopg2://{login}@127.0.0.1:{port}/postgres",
                                      isolation_level="AUTOCOMMIT",
                                      poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("CREATE DATABASE tuner"))
    try:
        yield f"postgresql+psycopg2://{login}@127.0.0.1:{port}/tuner", data, port
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D",
                        str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)


@pytest.fixture
def private_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, int]]:
    """A throw-away PostgreSQL cluster this test may stop and start at will."""
    with _private_cluster(tmp_path_factory.mktemp("pg")) as cluster:
        yield cluster


@pytest.fixture
def password_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throw-away cluster that checks passwords (the shared one trusts every connection)."""
    with _private_cluster(tmp_path_factory.mktemp("pgpw"), "Super-pw-1234") as (url, _, _):
        yield url


def test_database_restart_mid_study(tmp_path: Path, private_pg: tuple[str, Path, int],
                                    workers: list[Worker]) -> None:
    url, data, port = private_pg
    n_trials = 6
    # ~3 s trials on any machine, so the poll below sees one mid-training before the end.
    _create(tmp_path, url, "restart", n_trials=n_trials, epochs=10, patience=10,
            family="user_models:slow")
    for name in ("a", "b"):
        workers.append(Worker(tmp_path, name, "--study", "restart", "--gpus", "none",
                              storage=url, env={"TUNER_GRACE_PERIOD": "5"}))

    def mid_study() -> bool:
        trials = _trials(url, "restart")
        return (any(t.state.name == "COMPLETE" for t in trials)
                and any(t.state.name == "RUNNING" and t.intermediate_values for t in trials))

    _wait_for("a finished trial and one mid-training", mid_study, workers=workers)
    before = {t.number: t.state.name for t in _trials(url, "restart")}
    _pg_ctl(data, port, "stop")
    time.sleep(4)  # a real outage: every worker's next call fails
    _pg_ctl(data, port, "start")
    codes = [w.wait() for w in workers]
    assert codes == [0, 0], "".join(w.stdout + w.stderr for w in workers)
    trials = _assert_budget_exact(url, "restart", n_trials)
    states = [t.state.name for t in trials]
    failed = [t for t in trials if t.state.name == "FAIL"]
    # A claim the outage cut short fails the trial it had just created, unrun, by design
    # (its worker no longer held the budget lock); no trial that ran may fail.
    reasons = [t.user_attrs.get("fail_reason") for t in failed
               if t.user_attrs.get("fail_reason") != LOST_LOCK or t.intermediate_values]
    assert not reasons, (states, reasons,  # live trials were not judged dead
                         "".join(w.stdout + w.stderr for w in workers))
    for number, state in before.items():  # nothing finished before the restart was lost
        if state == "COMPLETE":
            assert trials[number].state.name == "COMPLETE"
    for name, w in zip("ab", workers, strict=True):
        notes = [line for line in w.stderr.splitlines() if "database" in line]
        done = [line for line in w.stdout.splitlines() if line.startswith("[cpu] trial")]
        print(f"\n[PostgreSQL restart] worker {name}: {len(done)} trials finished; "
              f"{notes[0] if notes else 'no database error seen (pooled connections checked)'}"
              f"; exit {w.proc.returncode}")
    print(f"[PostgreSQL restart] states before {before}; after: {states}")


def test_a_short_outage_while_the_pruner_reads_the_study_fails_no_trial(
        tmp_path: Path, private_pg: tuple[str, Path, int], workers: list[Worker]) -> None:
    """The pruner reads the study at every epoch, through Optuna's caching storage and a
    private method of the storage underneath: an outage far inside the retry window is waited
    out there too, and the trial completes (it failed with a StorageInternalError)."""
    url, data, port = private_pg
    _create(tmp_path, url, "pruned-read", n_trials=1, epochs=40, patience=40,
            family="user_models:slow", pruner="median", extra_study="pruner_warmup = 1")
    worker = Worker(tmp_path, "w", "--study", "pruned-read", "--gpus", "none", storage=url)
    workers.append(worker)
    _wait_for("a trial past its pruning warm-up", lambda: any(
        t.state.name == "RUNNING" and len(t.intermediate_values) >= 3
        for t in _trials(url, "pruned-read")), workers=[worker])
    _pg_ctl(data, port, "stop")
    time.sleep(4)
    _pg_ctl(data, port, "start")
    assert worker.wait() == 0, worker.stdout + worker.stderr
    trials = _trials(url, "pruned-read")
    assert [t.state.name for t in trials] == ["COMPLETE"], [
        t.user_attrs.get("fail_reason") for t in trials]
    assert "database unreachable" in worker.stderr  # the outage was seen, and waited out


def test_a_child_restarted_during_an_outage_waits_for_the_database(
        tmp_path: Path, private_pg: tuple[str, Path, int], workers: list[Worker]) -> None:
    """A child dies (killed, out of memory) while the database is down: its replacement
    waits for the database as every call does, instead of giving up at once and leaving the
    worker with no process (it exited 1, and the trial stayed RUNNING)."""
    url, data, port = private_pg
    _create(tmp_path, url, "restart-down", n_trials=1, epochs=10, patience=10,
            family="user_models:slow")
    worker = Worker(tmp_path, "w", "--study", "restart-down", "--gpus", "none", storage=url)
    workers.append(worker)
    victim = _wait_for("a running trial", lambda: _running_with_pid(url, "restart-down"),
                       workers=[worker])
    _pg_ctl(data, port, "stop")
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    time.sleep(4)  # the parent restarts the child after 1 s; it finds no database
    _pg_ctl(data, port, "start")
    assert worker.wait() == 0, worker.stdout + worker.stderr
    assert "restarting in 1s" in worker.stdout
    trials = _assert_budget_exact(url, "restart-down", 1)
    _assert_retried(trials, victim.number)


def test_an_outage_longer_than_the_retry_window_stops_the_worker_in_one_line(
        tmp_path: Path, private_pg: tuple[str, Path, int], workers: list[Worker]) -> None:
    """Past $TUNER_DB_RETRY_SECONDS the worker gives up waiting: one line that says why, exit
    1, no traceback and no restart; its trial is still RUNNING, for a sweep to retry."""
    url, data, port = private_pg
    _create(tmp_path, url, "outage", n_trials=4, epochs=10, patience=10,
            family="user_models:slow")
    worker = Worker(tmp_path, "w", "--study", "outage", "--gpus", "none", storage=url,
                    env={"TUNER_DB_RETRY_SECONDS": "3"})
    workers.append(worker)
    _wait_for("a trial mid-training", lambda: any(
        t.state.name == "RUNNING" and t.intermediate_values for t in _trials(url, "outage")),
        workers=[worker])
    _pg_ctl(data, port, "stop")
    try:
        assert worker.wait(timeout=120) == 1, worker.stdout + worker.stderr
    finally:
        _pg_ctl(data, port, "start")
    errors = [line for line in worker.stderr.splitlines() if line.startswith("tuner: error:")]
    assert errors == ["tuner: error: [cpu] the database was unreachable for more than 3 s "
                      "($TUNER_DB_RETRY_SECONDS): connection to server at \"127.0.0.1\", "
                      f"port {port} failed: Connection refused"], worker.stderr
    assert "Traceback" not in worker.stderr and "restarting" not in worker.stdout
    assert [t.state.name for t in _trials(url, "outage")] == ["RUNNING"]


def test_a_sweep_that_waits_out_an_outage_judges_no_trial_dead(
        private_pg: tuple[str, Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The outage begins just after a sweep decided it may judge others, and ends once every
    heartbeat is older than the grace period. What the retried stale-trial query reads then
    says nothing about who is alive; the trial is judged only by a later sweep, if its
    worker really is gone."""
    from tuner import attrs
    from tuner.budget import Claimed, Claimer
    from tuner.storage import ResilientRDBStorage

    url, data, port = private_pg
    storage = ResilientRDBStorage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="sweep-outage", storage=storage)
    study.set_user_attr(attrs.SPEC, {"n_trials": 2})
    held = Claimer(study, storage).claim()
    assert isinstance(held, Claimed)
    judge = Claimer(optuna.load_study(study_name="sweep-outage", storage=storage), storage)
    may_judge = judge._may_judge_others
    allowed: list[bool] = []

    def then_the_server_stops() -> bool:
        allowed.append(may_judge())
        if allowed[-1]:
            _pg_ctl(data, port, "stop")
            threading.Timer(3, _pg_ctl, (data, port, "start")).start()  # > the grace period
        return allowed[-1]

    deadline = time.monotonic() + 60
    while not may_judge():  # a server that just started lets nobody judge yet
        assert time.monotonic() < deadline, "the fresh server never allowed judging"
        time.sleep(0.5)
    storage.record_heartbeat(held.trial_id)  # alive as the sweep begins
    monkeypatch.setattr(judge, "_may_judge_others", then_the_server_stops)
    judge.sweep()
    assert allowed == [True], "the sweep never reached its judgement"
    assert study.trials[0].state.name == "RUNNING", "judged dead by heartbeats nobody could write"

    monkeypatch.undo()  # the holder never beats again: once judging is allowed, it is dead
    deadline = time.monotonic() + 60
    while study.trials[0].state.name == "RUNNING":
        assert time.monotonic() < deadline, "a trial whose worker is gone was never failed"
        judge.sweep()
        time.sleep(0.5)
    assert study.trials[0].state.name == "FAIL"
    assert study.trials[1].state.name == "WAITING"  # queued again


# --- credentials ----------------------------------------------------------------------------

SECRET = "S3cret-pw-4711"


def _command_lines(pid: int) -> list[str]:
    """The command lines of a process and its children, as `ps` shows them."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid), "-p", str(pid)],
                         capture_output=True, text=True).stdout
    return out.splitlines()


def test_password_never_shows(tmp_path: Path, password_pg: str,
                              workers: list[Worker]) -> None:
    """Each way of giving the password reaches the server, which checks it; none shows it."""
    parsed = sqlalchemy.engine.make_url(password_pg)
    engine = sqlalchemy.create_engine(password_pg, poolclass=sqlalchemy.pool.NullPool)
    role = "tuner_user"
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f"CREATE ROLE {role} LOGIN PASSWORD '{SECRET}'"))
        conn.execute(sqlalchemy.text(f"GRANT ALL ON SCHEMA public TO {role}"))
    engine.dispose()
    with_password = parsed.set(username=role, password=SECRET).render_as_string(False)
    without = sqlalchemy.engine.URL.create(parsed.drivername, username=role, host=parsed.host,
                                           port=parsed.port, database=parsed.database
                                           ).render_as_string(False)
    _create(tmp_path, with_password, "secret", n_trials=1, epochs=1, family="user_models:tiny")
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET + "\n")
    ways = {"in the URL": (["--storage", with_password], {}),
            "in a file": (["--storage", without, "--storage-password-file", str(secret_file)], {}),
            "in PGPASSWORD": (["--storage", without], {"PGPASSWORD": SECRET})}
    for way, (flags, env) in ways.items():
        # the first runs the study's one trial; the others find the budget spent
        worker = Worker(tmp_path, way[3:], "--study", "secret", "--gpus", "0", *flags,
                        env=env)
        workers.append(worker)
        seen: list[str] = []
        while worker.proc.poll() is None:
            seen += _command_lines(worker.proc.pid)
            time.sleep(0.05)
        assert worker.proc.returncode == 0, (way, worker.stderr)
        children = [line for line in seen if "--child" in line]
        assert children, seen  # the child's command line was looked at
        shown = "\n".join(seen) + worker.stdout + worker.stderr
        if way != "in the URL":  # the URL flag itself is the user's own command line
            assert SECRET not in shown, way
        else:
            assert SECRET not in "\n".join(children) + worker.stdout + worker.stderr
    trial = _assert_budget_exact(with_password, "secret", 1)[0]
    assert trial.user_attrs["gpu"] == "0"  # the child saw CUDA_VISIBLE_DEVICES=0
    # the server does check: no password, or a wrong one, is refused in one line
    (tmp_path / "wrong").write_text("not-" + SECRET + "\n")
    for flags, why in ((["--storage", without], "no password supplied"),
                       (["--storage", without, "--storage-password-file",
                         str(tmp_path / "wrong")], "password authentication failed")):
        refused = run_tuner("status", "--study", "secret", *flags)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0], lines
        assert lines[0].endswith("give the password in the URL, in $PGPASSWORD or with "
                                 "--storage-password-file")
        assert SECRET not in refused.stdout + refused.stderr

    unreachable = run_tuner("worker", "--study", "x", "--storage",
                            f"postgresql+psycopg2://u:{SECRET}@127.0.0.1:1/db")
    assert unreachable.returncode == 1
    lines = unreachable.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuner: error: cannot open storage "
                                                   "postgresql+psycopg2://u:***@127.0.0.1:1/db")
    assert SECRET not in unreachable.stdout + unreachable.stderr


def test_workers_that_start_together_on_a_new_database_all_open_it(pg_url: str) -> None:
    """Six processes open a brand-new database at the same moment: each may find Optuna's
    tables half made by another; every one opens the storage, none fails."""
    code = ("import sys, time; from tuner.storage import open_storage; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
            "open_storage(sys.argv[1]).engine.dispose()")
    start = time.time() + 3  # after every interpreter has imported tuner
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
