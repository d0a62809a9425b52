"""Scaling with workers: trials per hour with 1 and 2 worker processes on one PostgreSQL study,
and a worked projection for N GPUs from the measured per-trial costs.

The study is registered with ``tuner create`` and worked by 1, then 2, real worker processes
(``tuner worker --gpus none --trials-per-gpu K`` when the supervisor is available, else K
``tuner run`` processes on the same study file, which run the same worker loop). Throughput
is counted two ways: over the whole wall time (process start and imports included) and over
the steady-state window from the first trial's start to the last trial's end (the storage's
own timestamps). The server's ``pg_stat_database`` gives the committed transactions per trial.

The projection uses the trial duration measured here and the database figures of
``bench_storage`` and ``bench_overhead`` when their JSON is in the output directory (run
``run_all.py`` for all of them).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    PY,
    database_counters,
    has_worker_verb,
    parse_args,
    study_file,
    table,
    throwaway_database,
    tuner_cli,
    write_result,
)

GPU_TRIAL_SECONDS = 60.0  # a CIFAR-10 CNN trial on one GPU: an assumption, stated as such


def _work(url: str, path: Path, name: str, workers: int, artifacts: Path,
          launcher: str) -> dict[str, Any]:
    import optuna

    tuner_cli("create", str(path), "--storage", url, "--artifacts", str(artifacts))
    before = database_counters(url)
    if launcher == "worker":  # one supervisor, `workers` CPU children
        cmds = [[PY, "-m", "tuner", "worker", "--study", name, "--storage", url, "--gpus",
                 "none", "--trials-per-gpu", str(workers)]]
    else:  # `workers` separate `tuner run` processes on the same study
        cmds = [[PY, "-m", "tuner", "run", str(path), "--storage", url]] * workers
    started = time.time()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in cmds]
    outputs = [p.communicate(timeout=3600)[0] for p in procs]
    wall = time.time() - started
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"worker exited {p.returncode}:\n{out[-3000:]}")
    time.sleep(1.0)  # let the server publish the exited backends' statistics
    after = database_counters(url)
    study = optuna.load_study(study_name=name, storage=url)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    window = (last - first).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    return {"workers": workers, "trials": len(trials), "wall_s": wall,
            "steady_window_s": window, "trials_per_hour_wall": 3600 * len(trials) / wall,
            "trials_per_hour_steady": 3600 * len(trials) / window,
            "trial_seconds_median": statistics.median(durations),
            "transactions_per_trial": (after["xact_commit"] - before["xact_commit"])
            / len(trials),
            "rows_written_per_trial": (after["rows_written"] - before["rows_written"])
            / len(trials),
            "command": " ".join(cmds[0][2:]).replace(url, "URL")
            + (f" (x{len(cmds)} processes)" if len(cmds) > 1 else "")}


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _projection(runs: list[dict[str, Any]], out: Path, epochs: int) -> tuple[dict, str]:
    one = runs[0]
    trial_s = one["trial_seconds_median"]
    tx_per_trial = one["transactions_per_trial"]
    storage = _load(out, "storage")
    overhead = _load(out, "overhead")
    p = {"trial_seconds_here": trial_s, "transactions_per_trial": tx_per_trial,
         "gpu_trial_seconds_assumed": GPU_TRIAL_SECONDS, "epochs_per_trial": epochs}
    if overhead:
        probes = overhead["probes"]
        p["sql_round_trips_per_trial"] = statistics.median(
            sum(v for k, v in pr["sql_count"].items() if k in ("claim", "fit", "after_fit",
                                                              "tell")) for pr in probes)
        p["sql_ms_per_trial"] = 1000 * statistics.median(
            sum(v for k, v in pr["sql_seconds"].items() if k in ("claim", "fit", "after_fit",
                                                                "tell")) for pr in probes)
    if storage:
        cells = [c for c in storage["cells"] if c["impl"] == "tuner" and c["sampler"] == "random"]
        big = max(c["workers"] for c in cells)
        at_big = [c for c in cells if c["workers"] == big]
        one_w = [c for c in cells if c["workers"] == 1]
        # Round trips per second the database sustained with the most workers hammering it.
        p["db_round_trips_per_s"] = statistics.median(
            c["throughput_per_s"] * c["round_trips_per_op"] for c in at_big)
        # The budget lock serializes claims: one claim holds it about one ask's time.
        p["claim_seconds"] = statistics.median(c["ask_p50_ms"] for c in one_w) / 1000
        p["connections_per_worker"] = statistics.median(
            c["peak_connections"] / c["workers"] for c in at_big)
        reads = storage["history_reads"]
        p["full_history_read_s"] = {str(r["history"]): r["full_read_s"] for r in reads}
    rows = []
    for label, t in (("this CPU trial", trial_s), ("GPU trial (assumed)", GPU_TRIAL_SECONDS)):
        row: list[Any] = [label, t, 3600 / t]
        rt = p.get("sql_round_trips_per_trial")
        if "db_round_trips_per_s" in p and rt:
            # Each worker also writes one heartbeat every 10 s while its trial runs.
            per_worker_rt_s = (rt + t / 10) / t
            n_db = p["db_round_trips_per_s"] / per_worker_rt_s
            n_lock = t / p["claim_seconds"]
            row += [n_db, n_lock, "database" if n_db < n_lock else "budget lock",
                    min(n_db, n_lock) * 3600 / t]
        else:
            row += [None, None, "run bench_storage and bench_overhead first", None]
        rows.append(row)
    p["rows"] = rows
    text = table(["trial kind", "trial s", "trials/h per GPU", "GPUs until DB saturates",
                  "GPUs until budget lock saturates", "saturates first",
                  "max trials/h"], rows)
    return p, text


def main() -> None:
    args = parse_args(__doc__, lambda p: p.add_argument(
        "--launcher", choices=("auto", "worker", "run"), default="auto",
        help="tuner worker --gpus none --trials-per-gpu K (auto: when available) or K x "
             "tuner run"))
    launcher = args.launcher
    if launcher == "auto":
        launcher = "worker" if has_worker_verb() else "run"
    n_trials, epochs, limit = (2, 2, 300) if args.quick else (10, 10, None)
    runs = []
    with throwaway_database("tuner_bench_scaling") as url, \
            tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for workers in (1, 2):
            name = f"scaling-{workers}"
            path = study_file(Path(tmp), name, n_trials=n_trials, epochs=epochs, pruner="none",
                              sampler="tpe", patience=epochs, limit=limit)
            runs.append(_work(url, path, name, workers, Path(tmp) / "artifacts", launcher))
            r = runs[-1]
            print(f"{workers} worker(s): {r['trials']} trials in {r['wall_s']:.1f}s, "
                  f"{r['trials_per_hour_steady']:.0f} trials/h steady", flush=True)
    base = runs[0]
    t1 = table(["workers", "trials", "wall s", "trials/h (wall)", "trials/h (steady)",
                "speed-up (steady)", "median trial s", "DB transactions/trial"],
               [(r["workers"], r["trials"], r["wall_s"], r["trials_per_hour_wall"],
                 r["trials_per_hour_steady"],
                 r["trials_per_hour_steady"] / base["trials_per_hour_steady"],
                 r["trial_seconds_median"], r["transactions_per_trial"]) for r in runs])
    projection, t2 = _projection(runs, args.out, epochs)
    write_result(args, "scaling", {"n_trials": n_trials, "epochs": epochs, "runs": runs,
                                   "launcher": launcher, "projection": projection},
                 [t1, t2])


if __name__ == "__main__":
    main()
