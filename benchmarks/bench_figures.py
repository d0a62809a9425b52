"""What the learning curves and the dashboard figures cost.

1. Bytes per trial of the stored curves: one real 20-epoch trial (``tuner run``, digits, the
   MLP, no early stop) on PostgreSQL; the stored ``curve`` attribute's size, and the bytes
   written for it over the trial (it is rewritten at every epoch).
2. A figure update (``FigurePublisher.update``: read the trials, draw both figures, save them
   and the note) on studies of 20 to 10,000 completed 20-epoch trials on PostgreSQL, and
   the throttled check every other finished trial pays; the bytes the figures take in the
   study and the transactions one update commits; the processor time an update records, the
   wait between two updates that follows (``$TUNER_FIGURE_INTERVAL``'s 30 s, or 50 times that
   processor time if longer) and the share of one worker's processor the figures then take.

``--quick``: 3 epochs and studies of 20 trials.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as c

sys.path.insert(0, str(c.REPO))


def curve_bytes(url: str, epochs: int) -> dict[str, object]:
    import sqlalchemy

    with tempfile.TemporaryDirectory() as tmp:
        path = c.study_file(Path(tmp), "curve-bytes", n_trials=1, epochs=epochs,
                            patience=epochs, limit=600, sampler="random")
        c.tuner_cli("run", str(path), "--storage", url, cwd=Path(tmp))
        best = c.tuner_cli("best", "--study", "curve-bytes", "--storage", url).stdout
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        text, stored = conn.execute(sqlalchemy.text(
            "SELECT value_json, pg_column_size(value_json) FROM trial_user_attributes "
            "WHERE key = 'curve'")).one()
    engine.dispose()
    curve = json.loads(text)
    n = len(curve["val_loss"])
    written = sum(len(json.dumps({k: v[:i] for k, v in curve.items()})) for i in range(1, n + 1))
    return {"epochs": n, "json_bytes": len(text), "stored_bytes": int(stored),
            "bytes_per_epoch": round(len(text) / n, 1), "written_over_trial": written,
            "tuner_best": [ln for ln in best.splitlines() if "→" in ln or "turned" in ln]}


def _synthetic(study, n: int, epochs: int) -> None:
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    dists = {"dropout": FloatDistribution(0.0, 0.6),
             "l2": FloatDistribution(1e-6, 1e-1, log=True),
             "augment": FloatDistribution(0.0, 0.6)}
    rng = random.Random(0)
    trials = []
    for _ in range(n):
        val = [round(2.0 - 0.25 * e + 0.012 * e * e + rng.uniform(0, 0.1), 5)
               for e in range(epochs)]
        train = [round(v - 0.02 * e, 5) for e, v in enumerate(val)]
        best = val.index(min(val)) + 1
        trials.append(create_trial(
            params={"dropout": rng.uniform(0, 0.6), "l2": 10 ** rng.uniform(-6, -1),
                    "augment": rng.uniform(0, 0.6)}, distributions=dists, value=min(val),
            intermediate_values={e + 1: v for e, v in enumerate(val)},
            user_attrs={"curve": {"t": [round(1.3 * (e + 1), 2) for e in range(epochs)],
                                  "train_loss": train, "val_loss": val},
                        "best_epoch": best, "gap": val[best - 1] - train[best - 1]}))
    study.add_trials(trials)


def update_cost(url: str, n: int, epochs: int, repeats: int) -> dict[str, float]:
    import sqlalchemy

    from tuner import attrs
    from tuner import study as studies
    from tuner.dashboard import COST_MULTIPLE, FigurePublisher
    from tuner.settings import figure_interval
    from tuner.spec import load_spec
    from tuner.storage import open_storage

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(c.study_file(Path(tmp), f"fig-{n}", n_trials=n + 10, epochs=epochs))
    storage = open_storage(url, heartbeat=False)
    study, _ = studies.create_or_resume(spec, storage)
    _synthetic(study, n, epochs)
    publisher = FigurePublisher(study, storage, interval=3600)
    counted = {"commit": 0, "statements": 0}

    def count(kind: str):  # noqa: ANN202
        def listener(*_: object) -> None:
            counted[kind] += 1
        return listener

    sqlalchemy.event.listen(storage.engine, "commit", count("commit"))
    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", count("statements"))
    times, cpus, commits, statements = [], [], [], []
    for i in range(repeats):
        before = dict(counted)
        t0 = time.perf_counter()
        assert publisher.update(force=True)
        times.append(time.perf_counter() - t0)
        commits.append(counted["commit"] - before["commit"])
        statements.append(counted["statements"] - before["statements"])
        if i:  # what the publisher records of a warm update: its processor seconds
            cpus.append(float(study.user_attrs[attrs.FIGURES_SECONDS]))
    checks = []
    for _ in range(repeats * 4):
        t0 = time.perf_counter()
        assert not publisher.after_trial()  # throttled: one read of the study's attributes
        checks.append(time.perf_counter() - t0)
    cpu = statistics.median(cpus)
    wait = max(figure_interval(), COST_MULTIPLE * cpu)
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        size = conn.execute(sqlalchemy.text(
            "SELECT COALESCE(SUM(octet_length(value_json)), 0) FROM study_system_attributes "
            "WHERE key LIKE 'dashboard:%'")).scalar_one()
    engine.dispose()
    storage.engine.dispose()
    return {"trials": n, "update_s_median": round(statistics.median(times), 3),
            "update_s_first": round(times[0], 3),
            "throttled_check_ms_median": round(1000 * statistics.median(checks), 2),
            "transactions_per_update": int(statistics.median(commits)),
            "statements_per_update": int(statistics.median(statements)),
            "figure_and_note_bytes": int(size), "update_cpu_s_median": round(cpu, 3),
            "wait_s": round(wait, 1), "worker_share": round(cpu / wait, 4)}


def main() -> None:
    args = c.parse_args(__doc__)
    epochs = 3 if args.quick else 20
    sizes = [20] if args.quick else [20, 200, 1000, 4000, 10000]
    with c.throwaway_database("tuner_bench_curve") as url:
        curve = curve_bytes(url, epochs)
    updates = []
    for n in sizes:
        with c.throwaway_database("tuner_bench_fig") as url:
            updates.append(update_cost(url, n, epochs, repeats=3 if args.quick else 5))
    tables = [
        c.table(["epochs", "curve JSON bytes", "stored (pg_column_size)", "bytes/epoch",
                 "bytes written over the trial"],
                [[curve["epochs"], curve["json_bytes"], curve["stored_bytes"],
                  curve["bytes_per_epoch"], curve["written_over_trial"]]]),
        c.table(["completed trials", "update (median s)", "first update s",
                 "throttled check (ms)", "commits/update", "statements/update",
                 "figures + note bytes", "update CPU s (median)", "wait between updates s",
                 "CPU share of a worker"],
                [[u["trials"], u["update_s_median"], u["update_s_first"],
                  u["throttled_check_ms_median"], u["transactions_per_update"],
                  u["statements_per_update"], u["figure_and_note_bytes"],
                  u["update_cpu_s_median"], u["wait_s"], u["worker_share"]] for u in updates]),
    ]
    c.write_result(args, "figures", {"curve": curve, "updates": updates}, tables)


if __name__ == "__main__":
    main()
