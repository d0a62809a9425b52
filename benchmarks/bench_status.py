"""`tuner status` on a 10,000-trial study: the whole command and the in-process function.

For SQLite and PostgreSQL (a throwaway database), a study is filled through Optuna's own API
with tuner-shaped trials (4 parameters, a value, tuner's 11 user attributes, 15 per-epoch
intermediate values; 85 % complete, 10 % pruned, 5 % failed), plus 4 running trials with
heartbeats and 2 queued ones. ``study.add_trials`` writes the first few hundred trials; it runs
at about 25 trials per second on this machine, so the rest are copies of those rows inserted in
bulk (SQLAlchemy ``executemany`` on Optuna's tables), which gives the same rows Optuna would
have written. Then it times:

* ``tuner status --study NAME`` as a subprocess (the whole command a user waits for:
  interpreter start, imports, connect, queries, print), several repeats, median;
* the in-process :func:`tuner.inspect.all_status` on an open storage (the queries alone);
* for contrast, loading every trial (``storage.get_all_trials``), which is what
  ``study.trials`` and a naive status would pay;
* the floor, interleaved with the command runs: ``python -c "import optuna, sqlalchemy"``
  (the interpreter and the two libraries every storage access needs).

The goal is "well under a second" for the whole command. ``--quick`` uses 1,000 trials.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import PY, parse_args, study_file, table, throwaway_database, write_result

STUDY = "status-bench"
SEED_TRIALS = 200
FLOOR = [PY, "-c", "import optuna, sqlalchemy"]
EPOCHS = 15


def _seed_trials(n: int) -> list[Any]:
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    dists = {"dropout": FloatDistribution(0.0, 0.6), "l2": FloatDistribution(1e-6, 1e-1, log=True),
             "augment": FloatDistribution(0.0, 0.6),
             "learning_rate": FloatDistribution(3e-4, 3e-3, log=True)}
    rng = random.Random(0)
    trials = []
    for i in range(n):
        params = {"dropout": rng.uniform(0, 0.6), "l2": 10 ** rng.uniform(-6, -1),
                  "augment": rng.uniform(0, 0.6), "learning_rate": 10 ** rng.uniform(-3.5, -2.6)}
        state = (TrialState.FAIL if i % 20 == 19 else TrialState.PRUNED if i % 10 == 9
                 else TrialState.COMPLETE)
        value = 0.1 + rng.random()
        epochs = 4 if state == TrialState.PRUNED else EPOCHS
        curve = {e: value + 0.5 / e for e in range(1, epochs + 1)}
        attrs: dict[str, Any] = {"host": f"node-{i % 4}", "gpu": str(i % 2)}
        if state != TrialState.FAIL:
            attrs.update(val_accuracy=0.9, train_loss=value - 0.05, gap=0.05,
                         keras_val_loss=value + 0.2, best_epoch=epochs, epochs_run=epochs,
                         pruned_at=epochs if state == TrialState.PRUNED else None,
                         seconds=30.0 + i % 7,
                         model_artifact=f"00000000-0000-4000-8000-{i:012d}")
        else:
            attrs["fail_reason"] = "loss became nan at epoch 3"
            curve = {}
        trials.append(create_trial(
            params=params, distributions=dists, state=state,
            value=value if state == TrialState.COMPLETE else None,
            intermediate_values=curve, user_attrs=attrs))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return trials


def _grow(engine: Any, study_id: int, target: int) -> float:
    """Copy the study's first trials (and their rows) in bulk until it holds ``target``."""
    import sqlalchemy

    meta = sqlalchemy.MetaData()
    names = ("trials", "trial_params", "trial_values", "trial_user_attributes",
             "trial_intermediate_values")
    tables = {n: sqlalchemy.Table(n, meta, autoload_with=engine) for n in names}
    trials = tables["trials"]
    started = time.perf_counter()
    with engine.begin() as conn:
        seed = conn.execute(sqlalchemy.select(trials).where(trials.c.study_id == study_id)
                            .order_by(trials.c.number)).mappings().all()
        children = {}
        ids = [row["trial_id"] for row in seed]
        for name in names[1:]:
            t = tables[name]
            pk = next(iter(t.primary_key.columns)).name
            rows = conn.execute(sqlalchemy.select(t).where(t.c.trial_id.in_(ids))).mappings()
            children[name] = [{k: v for k, v in r.items() if k != pk} for r in rows]
        count = len(seed)
        while count < target:
            batch = seed[: target - count]
            new_rows = [{"number": count + i, "study_id": study_id, "state": r["state"],
                         "datetime_start": r["datetime_start"],
                         "datetime_complete": r["datetime_complete"]}
                        for i, r in enumerate(batch)]
            new_ids = conn.execute(
                sqlalchemy.insert(trials).returning(trials.c.trial_id,
                                                    sort_by_parameter_order=True),
                new_rows).scalars().all()
            mapping = {r["trial_id"]: n for r, n in zip(batch, new_ids, strict=True)}
            for name, rows in children.items():
                copied = [{**r, "trial_id": mapping[r["trial_id"]]} for r in rows
                          if r["trial_id"] in mapping]
                if copied:
                    conn.execute(sqlalchemy.insert(tables[name]), copied)
            count += len(batch)
    return time.perf_counter() - started


def _build(url: str, n_trials: int, workdir: Path) -> dict[str, Any]:
    import optuna

    from tuner import optuna_sql
    from tuner import study as studies
    from tuner.spec import load_spec
    from tuner.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(study_file(workdir, STUDY, n_trials=n_trials + 100, epochs=EPOCHS))
    storage = open_storage(url, heartbeat=False)
    study, _ = studies.create_or_resume(spec, storage, str(workdir / "artifacts"))
    seed = _seed_trials(min(SEED_TRIALS, n_trials))
    t0 = time.perf_counter()
    study.add_trials(seed)
    add_s = time.perf_counter() - t0
    study_id = storage.get_study_id_from_name(study.study_name)
    grow_s = _grow(storage.engine, study_id, n_trials)
    dists = seed[0].distributions
    for k in range(4):
        trial = study.ask(dists)
        trial.set_user_attr("host", f"gpu-node-{k}")
        trial.set_user_attr("gpu", str(k))
        for epoch in range(1, 3 + k):
            trial.report(1.0 / epoch, epoch)
        storage.record_heartbeat(trial._trial_id)
    for _ in range(2):
        study.enqueue_trial({"dropout": 0.1, "l2": 1e-4, "augment": 0.1,
                             "learning_rate": 1e-3})
    with storage.engine.connect() as conn:
        counts = optuna_sql.count_states(conn, study_id)
    storage.engine.dispose()
    return {"add_trials_per_s": len(seed) / add_s, "bulk_copy_s": grow_s, "counts": counts}


def _time_command(cmd: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} exited {proc.returncode}: "
                               f"{proc.stderr[-1000:]}")
    return times


def _measure(url: str, repeats: int) -> dict[str, Any]:
    from tuner import optuna_sql, render
    from tuner.inspect import all_status
    from tuner.storage import open_storage

    cli = [PY, "-m", "tuner", "status", "--study", STUDY, "--storage", url]
    # Interleaved with the import floor, so both see the same load on a shared machine.
    cli_s, floor_s = [], []
    for _ in range(repeats):
        floor_s += _time_command(FLOOR, 1)
        cli_s += _time_command(cli, 1)
    json_s = _time_command([*cli, "--json"], max(3, repeats // 2))
    t0 = time.perf_counter()
    storage = open_storage(url, heartbeat=False)
    open_s = time.perf_counter() - t0
    all_status(storage.engine, STUDY)  # warm the pool
    fn_s = []
    for _ in range(max(10, repeats * 3)):
        t0 = time.perf_counter()
        (status,) = all_status(storage.engine, STUDY)
        fn_s.append(time.perf_counter() - t0)
    study_id = storage.get_study_id_from_name(STUDY)
    t0 = time.perf_counter()
    n_loaded = len(storage.get_all_trials(study_id, deepcopy=False))
    load_all_s = time.perf_counter() - t0
    with storage.engine.connect() as conn:
        counts = optuna_sql.count_states(conn, study_id)
    storage.engine.dispose()
    return {
        "cli_median_s": statistics.median(cli_s), "cli_s": cli_s,
        "floor_median_s": statistics.median(floor_s),
        "above_floor_median_s": statistics.median(c - f for c, f in zip(cli_s, floor_s,
                                                                         strict=True)),
        "cli_json_median_s": statistics.median(json_s),
        "open_storage_s": open_s,
        "function_median_s": statistics.median(fn_s), "function_max_s": max(fn_s),
        "load_all_trials_s": load_all_s, "trials_loaded": n_loaded,
        "counts": counts, "status_text": render.status(status),
    }


def main() -> None:
    args = parse_args(__doc__)
    n_trials = 1000 if args.quick else 10_000
    repeats = 3 if args.quick else 7
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        sqlite_url = f"sqlite:///{Path(tmp) / 'status.db'}"
        with throwaway_database("tuner_bench_status") as pg_url:
            for backend, url in (("sqlite", sqlite_url), ("postgresql", pg_url)):
                print(f"{backend}: building a {n_trials:,}-trial study ...", flush=True)
                built = _build(url, n_trials, Path(tmp) / backend)
                print(f"{backend}: timing tuner status ...", flush=True)
                results[backend] = {**built, **_measure(url, repeats)}
    rows = [[backend, sum(r["counts"].values()), r["cli_median_s"], min(r["cli_s"]),
             max(r["cli_s"]), r["cli_json_median_s"], r["floor_median_s"],
             r["above_floor_median_s"], r["function_median_s"] * 1000,
             r["open_storage_s"] * 1000, r["load_all_trials_s"]]
            for backend, r in results.items()]
    timing = table(["storage", "trials", "`tuner status` median s", "min s", "max s",
                    "`--json` median s", "import floor median s", "above floor median s",
                    "queries median ms", "RDBStorage open ms", "load all trials s (avoided)"],
                   rows)
    built = table(["storage", "add_trials per s", "bulk copy s"],
                  [[b, r["add_trials_per_s"], r["bulk_copy_s"]] for b, r in results.items()])
    worst = max(r["cli_median_s"] for r in results.values())
    result = {"n_trials": n_trials, "repeats": repeats,
              "results": results, "goal": {"cli_under_s": 1.0, "met": worst < 1.0,
                                           "worst_cli_median_s": worst}}
    print(results["postgresql"]["status_text"], end="\n\n")
    write_result(args, "bench_status", result, [timing, built])


if __name__ == "__main__":
    main()
