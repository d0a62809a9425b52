"""Storage at scale: ask+tell latency on PostgreSQL against study history and worker count.

For studies holding 1k, 10k and 50k finished trials (4 parameters, a value, 3 user attributes
and 15 intermediate values each, like a real tuner trial), 1, 4 and 16 worker processes each
run a closed loop of ask → suggest the 4 knobs → tell, with no training in between: the
worst case for the database. Two implementations run on the same study in the same run:

* **tuner**: ``tuner.storage.open_storage`` (pool limits, pre-ping, retry, heartbeat) and
  ``tuner.budget.Claimer.claim`` (budget lock + stale-trial check + count + ask), then tell;
* **optuna**: ``optuna.storages.RDBStorage(url)`` with its default setup and ``study.ask()``.

Both use the RandomSampler so the number measures the storage, not the sampler; TPE's
per-ask cost (it reads the whole history) is reported separately, with the time of one full
history read (what TPE and the dashboard pay). The PostgreSQL connection count is sampled
from ``pg_stat_activity`` while the cell runs.

History is built with ``study.add_trials`` (its rate is reported) for the first few hundred
trials, then copied server-side with ``INSERT ... SELECT`` on Optuna's tables until the study
holds the target count: add_trials runs at tens of trials per second here, so 50k trials that
way would take longer than the whole suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import (
    percentile,
    spread,
    study_file,
    table,
    throwaway_database,
    write_result,
)

STUDY = "storage-bench"


# ---------------------------------------------------------------- child: one worker process
def _child(url: str, spec_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import optuna

    from tuner import study as studies
    from tuner.budget import Claimer
    from tuner.space import sample
    from tuner.spec import load_spec
    from tuner.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(spec_path)
    ours = open_storage(url)
    plain = optuna.storages.RDBStorage(url)
    round_trips = [0]

    def count(*_: object) -> None:
        round_trips[0] += 1

    from sqlalchemy import event

    for engine in (ours.engine, plain.engine):
        event.listen(engine, "after_cursor_execute", count)
        event.listen(engine, "commit", count)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            return
        ours.engine.dispose()
        plain.engine.dispose()
        if cmd["cmd"] == "dispose":
            print("{}", flush=True)
            continue
        run_spec = replace(spec, sampler=cmd["sampler"])
        if cmd["impl"] == "tuner":
            study, _ = studies.load(STUDY, ours)
            study.sampler = studies.make_sampler(run_spec, seed_offset=cmd["worker"])
        else:
            sampler = (optuna.samplers.RandomSampler(seed=cmd["worker"])
                       if cmd["sampler"] == "random" else optuna.samplers.TPESampler())
            study = optuna.load_study(study_name=STUDY, storage=plain, sampler=sampler)
        claimer = Claimer(study, ours)  # one per worker process, as in a real worker

        def op(cmd=cmd, study=study, run_spec=run_spec,  # noqa: ANN001
               claimer=claimer) -> tuple[float, float]:
            t0 = time.perf_counter()
            if cmd["impl"] == "tuner":
                trial = claimer.claim().trial
            else:
                trial = study.ask()
            hp = sample(trial, run_spec)
            t1 = time.perf_counter()
            study.tell(trial, 0.1 + hp.dropout[0])
            return t1 - t0, time.perf_counter() - t1

        # A worker's first ask loads the study's history into Optuna's trial cache once;
        # it is timed apart (untimed by the barrier) so p50/p99 are the steady state.
        first = sum(op())
        time.sleep(max(0.0, cmd["start_at"] - time.time()))
        asks, tells = [], []
        round_trips[0] = 0
        for _ in range(cmd["ops"]):
            a, t = op()
            asks.append(a)
            tells.append(t)
        print(json.dumps({"ask": asks, "tell": tells, "end": time.time(), "first": first,
                          "round_trips": round_trips[0]}), flush=True)


# ---------------------------------------------------------------- parent
class _Workers:
    """N persistent child processes, driven one JSON line at a time."""

    def __init__(self, n: int, url: str, spec_path: Path) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.first_op_s = 1.0  # grows to the slowest first ask seen (a full history read)
        self.procs = [subprocess.Popen([sys.executable, __file__, "--child", url, str(spec_path)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       env=env) for _ in range(n)]
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a storage benchmark worker failed to start")

    def run(self, n: int, impl: str, sampler: str, ops: int,
            conns: _ConnectionSampler) -> list[dict[str, Any]]:
        for p in self.procs:  # idle workers hold no connections during the cell
            p.stdin.write(json.dumps({"cmd": "dispose"}) + "\n")
            p.stdin.flush()
        for p in self.procs:
            p.stdout.readline()
        start_at = time.time() + 1.0 + 2.0 * self.first_op_s
        conns.since = start_at + 0.1
        for i, p in enumerate(self.procs[:n]):
            p.stdin.write(json.dumps({"cmd": "run", "impl": impl, "sampler": sampler, "ops": ops,
                                      "start_at": start_at, "worker": i}) + "\n")
            p.stdin.flush()
        results = []
        for p in self.procs[:n]:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError("a storage benchmark worker died")
            results.append({**json.loads(line), "start": start_at})
        self.first_op_s = max(self.first_op_s, max(r["first"] for r in results))
        return results

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                p.stdin.flush()
            except OSError:
                pass
        for p in self.procs:
            p.wait(timeout=60)


class _ConnectionSampler:
    """The peak number of backends connected to one database while a cell runs."""

    def __init__(self, url: str) -> None:
        import sqlalchemy

        self.db = sqlalchemy.engine.make_url(url).database
        admin = sqlalchemy.engine.make_url(url).set(database="postgres")
        self.engine = sqlalchemy.create_engine(admin, poolclass=sqlalchemy.pool.NullPool)
        self.query = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d")

    def __enter__(self) -> _ConnectionSampler:
        self.peak, self.stop, self.since = 0, threading.Event(), float("inf")
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        with self.engine.connect() as conn:
            while not self.stop.wait(0.05):
                n = conn.execute(self.query, {"d": self.db}).scalar()
                if time.time() >= self.since:  # not while the previous cell's backends exit
                    self.peak = max(self.peak, n)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _seed_trials(study: Any, n: int) -> float:
    """Add ``n`` finished trials shaped like tuner's through ``study.add_trials``; trials/s."""
    import random

    import optuna
    from optuna.distributions import FloatDistribution

    dists = {"dropout": FloatDistribution(0.0, 0.6), "l2": FloatDistribution(1e-6, 0.1, log=True),
             "augment": FloatDistribution(0.0, 0.6),
             "learning_rate": FloatDistribution(3e-4, 3e-3, log=True)}
    rng = random.Random(0)
    trials = []
    for _ in range(n):
        params = {k: (rng.uniform(d.low, d.high) if not d.log
                      else d.low * (d.high / d.low) ** rng.random()) for k, d in dists.items()}
        value = 0.1 + rng.random()
        trials.append(optuna.trial.create_trial(
            params=params, distributions=dists, value=value,
            user_attrs={"val_accuracy": 0.9, "epochs_run": 15, "seconds": 6.0},
            intermediate_values={i + 1: value + 0.01 * (15 - i) for i in range(15)}))
    started = time.perf_counter()
    study.add_trials(trials)
    return n / (time.perf_counter() - started)


def _grow(engine: Any, study_id: int, target: int) -> float:
    """Copy the study's trials server-side until it holds ``target``; seconds taken."""
    import sqlalchemy

    started = time.perf_counter()
    copy = sqlalchemy.text("""
        WITH base AS (SELECT count(*) AS n FROM trials WHERE study_id = :sid),
        src AS (SELECT trial_id, number FROM trials WHERE study_id = :sid
                ORDER BY number LIMIT :k),
        ins AS (INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete)
                SELECT (SELECT n FROM base) + row_number() OVER (ORDER BY s.number) - 1,
                       t.study_id, t.state, t.datetime_start, t.datetime_complete
                FROM src s JOIN trials t ON t.trial_id = s.trial_id ORDER BY s.number
                RETURNING trial_id, number),
        m AS (SELECT ins.trial_id AS new_id, s.trial_id AS old_id FROM ins
              JOIN src s ON s.number = ins.number - (SELECT n FROM base)),
        p AS (INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json)
              SELECT m.new_id, x.param_name, x.param_value, x.distribution_json
              FROM trial_params x JOIN m ON x.trial_id = m.old_id),
        v AS (INSERT INTO trial_values (trial_id, objective, value, value_type)
              SELECT m.new_id, x.objective, x.value, x.value_type
              FROM trial_values x JOIN m ON x.trial_id = m.old_id),
        u AS (INSERT INTO trial_user_attributes (trial_id, key, value_json)
              SELECT m.new_id, x.key, x.value_json
              FROM trial_user_attributes x JOIN m ON x.trial_id = m.old_id),
        i AS (INSERT INTO trial_intermediate_values
                  (trial_id, step, intermediate_value, intermediate_value_type)
              SELECT m.new_id, x.step, x.intermediate_value, x.intermediate_value_type
              FROM trial_intermediate_values x JOIN m ON x.trial_id = m.old_id)
        SELECT count(*) FROM ins""")
    count = sqlalchemy.text("SELECT count(*) FROM trials WHERE study_id = :sid")
    with engine.begin() as conn:
        have = conn.execute(count, {"sid": study_id}).scalar()
    while have < target:
        with engine.begin() as conn:
            conn.execute(copy, {"sid": study_id, "k": min(have, target - have)})
            have = conn.execute(count, {"sid": study_id}).scalar()
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("ANALYZE"))
    return time.perf_counter() - started


def _cell(workers: _Workers, n: int, impl: str, sampler: str, ops: int, url: str,
          history: int) -> dict[str, Any]:
    with _ConnectionSampler(url) as conns:
        results = workers.run(n, impl, sampler, ops, conns)
    lat = [a + t for r in results for a, t in zip(r["ask"], r["tell"], strict=True)]
    asks = [a for r in results for a in r["ask"]]
    tells = [t for r in results for t in r["tell"]]
    wall = max(r["end"] for r in results) - results[0]["start"]
    cell = {"history": history, "workers": n, "impl": impl, "sampler": sampler,
            "ops": len(lat), "p50_ms": 1000 * percentile(lat, 50),
            "p99_ms": 1000 * percentile(lat, 99), "ask_p50_ms": 1000 * percentile(asks, 50),
            "tell_p50_ms": 1000 * percentile(tells, 50), "throughput_per_s": len(lat) / wall,
            "peak_connections": conns.peak,
            "round_trips_per_op": sum(r["round_trips"] for r in results) / len(lat),
            "first_op_ms": 1000 * max(r["first"] for r in results)}
    print(f"  {impl:6s} {sampler:6s} history {history:>6} x{n:<2} workers: "
          f"p50 {cell['p50_ms']:.1f} ms, p99 {cell['p99_ms']:.1f} ms, "
          f"{cell['throughput_per_s']:.1f} ops/s, {conns.peak} connections", flush=True)
    return cell


def main() -> None:
    from _common import parse_args

    args = parse_args(__doc__, lambda p: p.add_argument(
        "--sizes", type=int, nargs="+", metavar="N",
        help="study sizes to measure (default 1000 10000 50000)"))
    if args.quick:
        sizes, worker_counts, seed_n, tpe_sizes = [100, 300], [1, 2], 50, [100]
        ops = {1: 10, 2: 5}
        tpe_ops = 2
    else:
        sizes, worker_counts, seed_n, tpe_sizes = [1000, 10000, 50000], [1, 4, 16], 300, \
            [1000, 10000, 50000]
        ops = {1: 60, 4: 25, 16: 10}
        tpe_ops = 3
    if args.sizes:
        sizes, tpe_sizes = sorted(args.sizes), sorted(args.sizes)
    import optuna

    from tuner import study as studies
    from tuner.spec import load_spec
    from tuner.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cells: list[dict[str, Any]] = []
    reads: list[dict[str, Any]] = []
    with throwaway_database("tuner_bench_storage") as url, \
            tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        spec_path = study_file(Path(tmp), STUDY, n_trials=10**9, epochs=15, sampler="random")
        storage = open_storage(url)
        study, _ = studies.create_or_resume(load_spec(spec_path), storage, tmp)
        add_rate = _seed_trials(study, seed_n)
        print(f"study.add_trials: {add_rate:.1f} trials/s", flush=True)
        workers = _Workers(max(worker_counts), url, spec_path)
        try:
            for size in sizes:
                grow_s = _grow(storage.engine, study._study_id, size)
                history = len(study.get_trials(deepcopy=False))
                t0 = time.perf_counter()
                reader = optuna.storages.RDBStorage(url)
                optuna.load_study(study_name=STUDY, storage=reader).get_trials(deepcopy=False)
                reads.append({"history": history, "full_read_s": time.perf_counter() - t0,
                              "grow_s": grow_s})
                reader.engine.dispose()
                print(f"history {history}: grown in {grow_s:.1f}s, full history read "
                      f"{reads[-1]['full_read_s']:.2f}s", flush=True)
                storage.engine.dispose()
                for n in worker_counts:
                    for impl in ("tuner", "optuna"):
                        cells.append(_cell(workers, n, impl, "random", ops[n], url, history))
                if size in tpe_sizes:
                    for impl in ("tuner", "optuna"):
                        cells.append(_cell(workers, 1, impl, "tpe", tpe_ops, url, history))
        finally:
            workers.close()
            storage.engine.dispose()

    rand = [c for c in cells if c["sampler"] == "random"]
    t1 = table(["history", "workers", "storage", "p50 ms", "p99 ms", "ask p50 ms",
                "tell p50 ms", "ops/s", "peak PG connections", "SQL round trips/op"],
               [(c["history"], c["workers"], c["impl"], c["p50_ms"], c["p99_ms"],
                 c["ask_p50_ms"], c["tell_p50_ms"], c["throughput_per_s"],
                 c["peak_connections"], c["round_trips_per_op"]) for c in rand])
    t2 = table(["history", "storage", "TPE ask+tell p50 ms", "full history read s"],
               [(c["history"], c["impl"], c["p50_ms"],
                 min(reads, key=lambda r: abs(r["history"] - c["history"]))["full_read_s"])
                for c in cells
                if c["sampler"] == "tpe"])

    def p50_at(size_index: int, impl: str, workers: int = 1) -> float:
        mine = [c for c in rand if c["impl"] == impl and c["workers"] == workers]
        return min(mine, key=lambda c: abs(c["history"] - sizes[size_index]))["p50_ms"]

    mid = min(1, len(sizes) - 1)
    goal = {impl: {"p50_ms_at_" + str(sizes[mid]): p50_at(mid, impl),
                   "growth_smallest_to_largest": p50_at(len(sizes) - 1, impl) / p50_at(0, impl),
                   "history_growth": sizes[-1] / sizes[0]} for impl in ("tuner", "optuna")}
    t3 = table(["storage", f"p50 ms at {sizes[mid]} (1 worker)", "goal < 50 ms",
                f"p50 growth {sizes[0]}→{sizes[-1]}", "history growth"],
               [(impl, g["p50_ms_at_" + str(sizes[mid])],
                 "met" if g["p50_ms_at_" + str(sizes[mid])] < 50 else "missed",
                 g["growth_smallest_to_largest"], g["history_growth"])
                for impl, g in goal.items()])
    conns16 = {c["impl"]: c["peak_connections"] for c in rand
               if c["workers"] == max(worker_counts) and c["history"] == rand[-1]["history"]}
    write_result(args, "storage", {
        "sizes": sizes, "worker_counts": worker_counts, "add_trials_per_s": add_rate,
        "cells": cells, "history_reads": reads, "goal": goal,
        "peak_connections_at_max_workers": conns16,
        "latency_summary": {impl: spread([c["p50_ms"] for c in rand if c["impl"] == impl])
                            for impl in ("tuner", "optuna")}},
        [t1, t2, t3])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        main()
