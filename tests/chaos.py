"""Chaos rounds: real `tuner worker` processes on one PostgreSQL study, killed at random.

Each round creates a study, starts three workers (each in its own process group, as on its own
node), and at random moments sends one of them ``kill -9`` (to the parent, the child, or the
whole group) or SIGTERM, then starts a new worker in its place. The moments are drawn from the
whole study: while training, claiming or waiting, and during the last trials. A round passes
when the study ends with exactly its budget finished, nothing RUNNING or WAITING, every worker
that was not killed exited 0, and every process was gone within grace + 60 s of the last trial
finishing. Used by ``tests/test_chaos.py`` (a short run) and ``benchmarks/bench_chaos.py``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy

TESTS = Path(__file__).resolve().parent
HEARTBEAT = {"TUNER_HEARTBEAT_INTERVAL": "1", "TUNER_GRACE_PERIOD": "3"}
GRACE = 3.0
KILLS = ("kill -9 parent", "kill -9 child", "kill -9 group", "SIGTERM")

STUDY = """\
[study]
name = "{name}"
n_trials = {n_trials}
sampler = "random"
pruner = "median"
seed = {seed}

[data]
source = "digits"
limit = 300

[model]
family = "user_models:tiny"
epochs = 3
batch_size = 64

[search]
dropout = [0.0, 0.5]
l2 = [1e-6, 1e-2]
augment = [0.0, 0.5]
"""


@dataclass
class RoundResult:
    """What one round did and how the study ended."""

    round: int
    budget: int
    kills: list[str] = field(default_factory=list)
    finished: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0
    workers_started: int = 0
    exit_codes: list[int] = field(default_factory=list)
    last_trial_to_all_gone_s: float | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class _Worker:
    def __init__(self, url: str, study: str, log: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNER_STORAGE": url,
               "PYTHONPATH": str(TESTS), **HEARTBEAT}
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tuner", "worker", "--study", study, "--gpus", "none"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pgid = self.proc.pid
        self.killed_parent = False

    def child(self) -> int | None:
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return None
        return int(text.split()[0]) if text.split() else None

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        # Zombies of our own children count as gone once reaped; poll() reaps the parent.
        self.proc.poll()
        return _group_members(self.pgid) > 0


def _group_members(pgid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            count += 1
    return count


def _counts(engine: sqlalchemy.Engine, name: str) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text(
            "SELECT t.state, COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "WHERE s.study_name = :n GROUP BY t.state"), {"n": name}).all()
    return Counter({(s.name if hasattr(s, "name") else str(s)): n for s, n in rows})


def create_study(url: str, tmp: Path, name: str, n_trials: int, seed: int) -> None:
    """Register the round's study in-process (no TensorFlow needed for that)."""
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.study import create_or_resume

    path = tmp / f"{name}.toml"
    path.write_text(STUDY.format(name=name, n_trials=n_trials, seed=seed))
    storage = open_storage(url, heartbeat=False)
    try:
        create_or_resume(load_spec(path), storage, str(tmp / "artifacts"))
    finally:
        storage.engine.dispose()


def run_round(url: str, tmp: Path, number: int, seed: int, *, n_trials: int = 6,
              n_workers: int = 3, max_kills: int = 3, limit_s: float = 600) -> RoundResult:
    """One round; never raises for a failed check (see :attr:`RoundResult.problems`)."""
    rng = random.Random(seed)
    name = f"chaos-{number}"
    result = RoundResult(round=number, budget=n_trials)
    started = time.monotonic()
    create_study(url, tmp, name, n_trials, seed)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    workers: list[_Worker] = []

    def start() -> None:
        workers.append(_Worker(url, name, tmp / f"{name}-w{len(workers)}.log"))

    for _ in range(n_workers):
        start()
    # When to strike: after a random number of finished trials (0 .. budget - 1, so the last
    # trials and waiting workers are hit too), plus a random delay.
    plan = sorted((rng.randint(0, n_trials - 1), rng.uniform(0.0, 3.0), rng.choice(KILLS))
                  for _ in range(rng.randint(1, max_kills)))
    last_finish: float | None = None
    seen_finished = 0
    try:
        while time.monotonic() - started < limit_s:
            counts = _counts(engine, name)
            finished = counts["COMPLETE"] + counts["PRUNED"]
            if finished > seen_finished:
                seen_finished = finished
                last_finish = time.monotonic()
            alive = [w for w in workers if w.proc.poll() is None]
            if plan and finished >= plan[0][0] and alive:
                _, delay, kind = plan.pop(0)
                time.sleep(delay)
                alive = [w for w in workers if w.proc.poll() is None]
                if alive:
                    _strike(rng.choice(alive), kind, result)
                    time.sleep(rng.uniform(0.0, 2.0))
                    start()
                continue
            if not any(w.group_alive() for w in workers):
                break
            time.sleep(0.3)
        else:
            result.problems.append(f"processes still running after {limit_s:.0f}s")
        all_gone = time.monotonic()
    finally:
        for w in workers:
            if w.group_alive():
                try:
                    os.killpg(w.pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            w.proc.wait(timeout=30)
    counts = _counts(engine, name)
    engine.dispose()
    result.finished = counts["COMPLETE"] + counts["PRUNED"]
    result.running, result.waiting, result.failed = (counts["RUNNING"], counts["WAITING"],
                                                     counts["FAIL"])
    result.workers_started = len(workers)
    result.exit_codes = [w.proc.returncode for w in workers if not w.killed_parent]
    result.seconds = round(time.monotonic() - started, 1)
    if last_finish is not None:
        result.last_trial_to_all_gone_s = round(all_gone - last_finish, 1)
    if result.finished != n_trials:
        result.problems.append(f"{result.finished} finished, budget {n_trials}")
    if result.running or result.waiting:
        result.problems.append(f"left {result.running} RUNNING, {result.waiting} WAITING")
    if any(code != 0 for code in result.exit_codes):
        logs = [w.log.read_text()[-2000:] for w in workers
                if not w.killed_parent and w.proc.returncode != 0]
        result.problems.append(f"exit codes {result.exit_codes}: {logs}")
    if (result.last_trial_to_all_gone_s is not None
            and result.last_trial_to_all_gone_s > GRACE + 60):
        result.problems.append(f"workers outlived the last trial by "
                               f"{result.last_trial_to_all_gone_s}s")
    return result


def _strike(worker: _Worker, kind: str, result: RoundResult) -> None:
    child = worker.child()
    if kind == "kill -9 child" and child is None:
        kind = "kill -9 parent"  # the child is not started yet (or is being restarted)
    try:
        if kind == "kill -9 parent":
            worker.proc.send_signal(signal.SIGKILL)
            worker.killed_parent = True
        elif kind == "kill -9 child":
            os.kill(child, signal.SIGKILL)  # type: ignore[arg-type]
        elif kind == "kill -9 group":
            os.killpg(worker.pgid, signal.SIGKILL)
            worker.killed_parent = True
        else:
            catches_sigterm(worker.proc.pid, wait_s=10)
            worker.proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    result.kills.append(kind)


def catches_sigterm(pid: int, wait_s: float = 0.0) -> bool:
    """Whether ``pid`` has a SIGTERM handler (its ``SigCgt`` mask), waiting up to ``wait_s``.

    A Python process dies of SIGTERM while the interpreter itself starts (tens of ms, before
    any of tuner's code runs), as every program does; tuner stops cleanly from its first line
    of code on. Strikes land from there.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        mask = next(int(line.split()[1], 16) for line in status.splitlines()
                    if line.startswith("SigCgt:"))
        if mask >> (signal.SIGTERM - 1) & 1:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
