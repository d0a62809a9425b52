"""Trial overhead: one tuner trial on PostgreSQL against a bare ``model.fit`` script.

Same network, data, fixed hyperparameters, seed and epochs, trained (a) by ``_bare_fit.py``
(plain Keras: no tuner, no Optuna) and (b) by ``tuner run`` on a one-trial study whose every
knob is a single number. Runs are interleaved a, b, a, b... and each is a fresh process, so
the ratio b/a covers everything a user waits for. A third process per repeat,
``_trial_probe.py``, runs the same trial through tuner's public functions with a stopwatch
between phases and every SQL statement counted, which is where the breakdown comes from.

The warm-worker figure, the one the goal is set on, is per trial: in one process,
``tuner.worker.work`` runs the study as a worker does, and after each of its trials a bare
fit of the identical network runs in between (see ``_trial_probe._warm``). Wall and CPU
seconds are both reported: on a shared machine the CPU figure varies less.
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
    HERE,
    PY,
    parse_args,
    study_file,
    table,
    throwaway_database,
    tuner_cli,
    write_result,
)

FIXED = {"dropout": 0.2, "l2": 1e-4, "augment": 0.3, "learning_rate": 1e-3}
SEED = 0
VALIDATION_SPLIT = 0.25


def _bench_json(out: str) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"no BENCH_JSON line in:\n{out[-3000:]}")


def _child(cmd: list[str]) -> tuple[float, float, dict[str, Any]]:
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[1]} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return started, ended, _bench_json(proc.stdout)


def _bare_cmd(epochs: int, batch: int, limit: int | None, check: bool = False) -> list[str]:
    cmd = [PY, str(HERE / "_bare_fit.py"), "--epochs", str(epochs), "--batch-size", str(batch),
           "--seed", str(SEED), "--dropout", str(FIXED["dropout"]), "--l2", str(FIXED["l2"]),
           "--augment", str(FIXED["augment"]), "--learning-rate", str(FIXED["learning_rate"]),
           "--validation-split", str(VALIDATION_SPLIT)]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd + (["--check"] if check else [])


def _bare(epochs: int, batch: int, limit: int | None) -> dict[str, float]:
    start, end, j = _child(_bare_cmd(epochs, batch, limit))
    return {"wall": end - start, "interpreter": j["t_main"] - start,
            "imports": j["t_imports"] - j["t_main"], "data": j["t_data"] - j["t_imports"],
            "build_fit": j["t_fit"] - j["t_data"], "fit": j["t_fit"] - j["t_build"],
            "build": j["t_build"] - j["t_data"], "exit": end - j["t_fit"],
            "val_loss": j["val_loss"], "epochs_run": j["epochs_run"]}


def _tuner(url: str, path: Path, name: str, artifacts: Path) -> dict[str, float]:
    import optuna

    start = time.time()
    tuner_cli("run", str(path), "--storage", url, "--artifacts", str(artifacts))
    wall = time.time() - start
    trial = optuna.load_study(study_name=name, storage=url).trials[0]
    assert trial.state.name == "COMPLETE", trial.state
    return {"wall": wall, "build_fit": float(trial.user_attrs["seconds"]),
            "val_loss": float(trial.value), "epochs_run": trial.user_attrs["epochs_run"]}


def _probe(url: str, path: Path, artifacts: Path) -> dict[str, Any]:
    start, end, j = _child([PY, str(HERE / "_trial_probe.py"), "--study-file", str(path),
                            "--storage", url, "--artifacts", str(artifacts)])
    s = j["stamps"]
    order = ["main", "imports", "tensorflow", "storage", "data", "claim", "fit", "after_fit",
             "tell"]
    phases = {"interpreter": s["main"] - start}
    for prev, cur in zip(order, order[1:], strict=False):
        phases[cur] = s[cur] - s[prev]
    phases["exit"] = end - s["tell"]
    return {"wall": end - start, "phases": phases, "sql_count": j["sql_count"],
            "sql_seconds": j["sql_seconds"], "epochs_run": j["epochs_run"]}


def _warm(url: str, path: Path, artifacts: Path, pairs: int) -> dict[str, list[float]]:
    return _child([PY, str(HERE / "_trial_probe.py"), "--study-file", str(path), "--storage",
                   url, "--artifacts", str(artifacts), "--warm", str(pairs)])[2]


def _warm_table(warm: dict[str, list[float]]) -> tuple[dict[str, Any], str]:
    """The per-trial comparison: its figures for the JSON, and its table."""
    warm_ratio = statistics.median(warm["tuner"]) / statistics.median(warm["bare"])
    cpu_ratio = statistics.median(warm["tuner_cpu"]) / statistics.median(warm["bare_cpu"])
    pair_ratios = [t / b for b, t in zip(warm["bare"], warm["tuner"], strict=True)]
    low, high = ratio_interval(warm["bare"], warm["tuner"])
    rows = [(f"pair {i + 1}", b, t, t / b, bc, tc, tc / bc, "") for i, (b, t, bc, tc) in
            enumerate(zip(warm["bare"], warm["tuner"], warm["bare_cpu"], warm["tuner_cpu"],
                          strict=True))]
    rows += [("median", statistics.median(warm["bare"]), statistics.median(warm["tuner"]),
              warm_ratio, statistics.median(warm["bare_cpu"]),
              statistics.median(warm["tuner_cpu"]), cpu_ratio, "<= 1.05"),
             ("median of the pairs' ratios", "", "", statistics.median(pair_ratios), "", "",
              "", ""),
             ("95 % interval of b/a (pairs resampled)", "", "", f"{low:.3f} - {high:.3f}",
              "", "", "", "")]
    collected = warm.get("gc_seconds")
    if collected:  # garbage collections, every GC_EVERY trials and fits: seconds a trial
        n = len(warm["bare"])
        rows.append(("of which garbage collection, mean", collected["bare"] / n,
                     collected["tuner"] / n, "", "", "", "", ""))
    figures = {"warm_ratio": warm_ratio, "warm": warm, "warm_cpu_ratio": cpu_ratio,
               "warm_pair_ratio_median": statistics.median(pair_ratios),
               "warm_ratio_interval": [low, high], "goal_met": warm_ratio <= 1.05}
    return figures, table(["warm worker, per trial", "bare fit s", "tuner trial s", "b/a",
                           "bare CPU s", "tuner CPU s", "CPU b/a", "goal"], rows)


def _warm_only(args: Any, epochs: int, limit: int | None, batch: int) -> None:
    """The warm comparison on a study with a test part (``--test-split``)."""
    search = {k: repr(v) for k, v in FIXED.items()}
    pairs = 2 if args.quick else args.warm_pairs
    with throwaway_database("tuner_bench_overhead") as url, \
            tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        path = study_file(Path(tmp), "warm", n_trials=pairs + 2, epochs=epochs,
                          pruner="none", sampler="random", seed=SEED, patience=epochs,
                          batch_size=batch, limit=limit, search=search,
                          test_split=args.test_split)
        warm = _warm(url, path, Path(tmp) / "artifacts", pairs)
    figures, t4 = _warm_table(warm)
    write_result(args, "overhead-test-split", {**figures, "test_split": args.test_split,
                 "epochs": epochs, "fixed": FIXED, "batch_size": batch, "limit": limit}, [t4])


def ratio_interval(bare: list[float], tuner: list[float], draws: int = 4000,
                   seed: int = 0) -> tuple[float, float]:
    """95 % interval of the ratio of medians, the pairs resampled (bootstrap): how far the
    machine's noise alone could move the figure."""
    import random

    rng = random.Random(seed)
    pairs = list(zip(bare, tuner, strict=True))
    ratios = sorted(
        statistics.median(t for _, t in sample) / statistics.median(b for b, _ in sample)
        for sample in ([rng.choice(pairs) for _ in pairs] for _ in range(draws)))
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def main() -> None:
    args = parse_args(__doc__, lambda p: (
        p.add_argument("--repeats", type=int),
        p.add_argument("--warm-pairs", type=int, default=11),
        p.add_argument("--test-split", type=float,
                       help="hold out this fraction as a test part, which every completed "
                            "trial (and the bare fit) is scored on; the warm worker only")))
    epochs, repeats, limit, batch = (2, 1, 300, 64) if args.quick else (20, 3, None, 64)
    repeats = args.repeats or repeats
    if args.test_split:
        return _warm_only(args, epochs, limit, batch)
    search = {k: repr(v) for k, v in FIXED.items()}
    check = _child(_bare_cmd(1, batch, limit, check=True))[2]
    if not check["identical"]:
        raise RuntimeError("the bare script's network differs from tuner.trial.build_model's")
    bare_runs: list[dict] = []
    tuner_runs: list[dict] = []
    probes: list[dict] = []
    with throwaway_database("tuner_bench_overhead") as url, \
            tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        from tuner.storage import open_storage

        open_storage(url).engine.dispose()  # tables exist before the first timed run
        for r in range(repeats):
            bare_runs.append(_bare(epochs, batch, limit))
            name = f"overhead-{r}"
            path = study_file(Path(tmp), name, n_trials=1, epochs=epochs, pruner="none",
                              sampler="random", seed=SEED, patience=epochs, batch_size=batch,
                              limit=limit, search=search)
            tuner_runs.append(_tuner(url, path, name, Path(tmp) / "artifacts"))
            path = study_file(Path(tmp), f"probe-{r}", n_trials=1, epochs=epochs,
                              pruner="none", sampler="random", seed=SEED, patience=epochs,
                              batch_size=batch, limit=limit, search=search)
            probes.append(_probe(url, path, Path(tmp) / "artifacts"))
            print(f"repeat {r + 1}/{repeats}: bare {bare_runs[-1]['wall']:.2f}s, "
                  f"tuner {tuner_runs[-1]['wall']:.2f}s, probe {probes[-1]['wall']:.2f}s",
                  flush=True)

        pairs = 2 if args.quick else args.warm_pairs
        path = study_file(Path(tmp), "warm", n_trials=pairs + 2, epochs=epochs,
                          pruner="none", sampler="random", seed=SEED, patience=epochs,
                          batch_size=batch, limit=limit, search=search)
        warm = _warm(url, path, Path(tmp) / "artifacts", pairs)

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    wall_ratio = med(tuner_runs, "wall") / med(bare_runs, "wall")
    fit_ratio = med(tuner_runs, "build_fit") / med(bare_runs, "build_fit")
    per_repeat = [(i + 1, b["wall"], t["wall"], t["wall"] / b["wall"], b["build_fit"],
                   t["build_fit"], t["build_fit"] / b["build_fit"])
                  for i, (b, t) in enumerate(zip(bare_runs, tuner_runs, strict=True))]
    t1 = table(["repeat", "bare wall s", "tuner wall s", "wall b/a", "bare build+fit s",
                "tuner build+fit s", "build+fit b/a"], per_repeat)
    t2 = table(["measure", "bare (a)", "tuner (b)", "b/a", "goal"], [
        ("whole process wall, median s", med(bare_runs, "wall"), med(tuner_runs, "wall"),
         wall_ratio, "<= 1.05"),
        ("in-process build+fit, median s", med(bare_runs, "build_fit"),
         med(tuner_runs, "build_fit"), fit_ratio, "<= 1.05"),
        ("best val_loss (unpenalized)", med(bare_runs, "val_loss"), med(tuner_runs, "val_loss"),
         med(tuner_runs, "val_loss") / med(bare_runs, "val_loss"), "same network: ~1"),
    ])
    phase_names = ["interpreter", "imports", "tensorflow", "storage", "data", "claim", "fit",
                   "after_fit", "tell", "exit"]
    labels = {"interpreter": "process start", "imports": "import optuna + tuner",
              "tensorflow": "import TensorFlow/Keras", "storage": "open storage + study",
              "data": "data load + tf.data", "claim": "claim trial (budget lock, ask)",
              "fit": "build + fit (incl. per-epoch report)",
              "after_fit": "record attrs + save artifact", "tell": "tell", "exit": "exit"}
    bare_map = {"interpreter": "interpreter", "tensorflow": "imports", "data": "data",
                "fit": "build_fit", "exit": "exit"}
    rows = []
    for ph in phase_names:
        t = statistics.median(p["phases"][ph] for p in probes)
        b = med(bare_runs, bare_map[ph]) if ph in bare_map else 0.0
        n = statistics.median(p["sql_count"].get(ph, 0) for p in probes)
        sq = statistics.median(p["sql_seconds"].get(ph, 0.0) for p in probes)
        rows.append((labels[ph], b, t, t - b, int(n), sq * 1000))
    rows.append(("total (probe process wall)", med(bare_runs, "wall"), med(probes, "wall"),
                 med(probes, "wall") - med(bare_runs, "wall"),
                 int(statistics.median(sum(p["sql_count"].values()) for p in probes)),
                 1000 * statistics.median(sum(p["sql_seconds"].values()) for p in probes)))
    t3 = table(["phase", "bare s", "tuner s", "extra s", "SQL round trips", "SQL ms"], rows)
    figures, t4 = _warm_table(warm)
    write_result(args, "overhead", {**figures,
        "epochs": epochs, "repeats": repeats, "fixed": FIXED, "batch_size": batch,
        "limit": limit, "wall_ratio": wall_ratio, "fit_ratio": fit_ratio,
        "bare": bare_runs, "tuner": tuner_runs, "probes": probes}, [t1, t2, t3, t4])


if __name__ == "__main__":
    main()
