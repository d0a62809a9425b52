"""Pruning savings: the same search with pruner none, median and hyperband.

Each search is a tuner study on PostgreSQL (the digits data, the ``mlp`` family, the search
space of ``studies/digits_demo.toml``, TPE with a fixed seed) run to the same number of trials
by ``tuner.worker.work``, the loop behind ``tuner run`` and ``tuner worker``. Per search: the
total epochs trained (the sum of every trial's ``epochs_run``, pruned trials included), the
wall time, and the best validation loss (unpenalized cross-entropy). Goal: >= 3x fewer epochs
than no pruning, for a best val_loss within 2 % of it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import parse_args, spread, study_file, table, throwaway_database, write_result

PRUNERS = ("none", "median", "hyperband")


def main() -> None:
    args = parse_args(__doc__, lambda p: p.add_argument("--seeds", type=int))
    if args.quick:
        seeds, n_trials, epochs, limit = [0], 2, 2, 200
    else:
        seeds, n_trials, epochs, limit = [0, 1], 16, 15, None
    if args.seeds:
        seeds = list(range(args.seeds))
    import optuna

    from tuner import study as studies
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.tfsetup import init_tensorflow
    from tuner.worker import work

    init_tensorflow()  # imported before the clock starts, as for every other search
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = []
    with throwaway_database("tuner_bench_pruning") as url, \
            tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        storage = open_storage(url)
        for seed in seeds:
            for pruner in PRUNERS:
                name = f"pruning-{pruner}-{seed}"
                path = study_file(Path(tmp), name, n_trials=n_trials, epochs=epochs,
                                  pruner=pruner, sampler="tpe", seed=seed, limit=limit)
                studies.create_or_resume(load_spec(path), storage, str(Path(tmp) / "art"))
                started = time.perf_counter()
                summary = work(storage, name)
                wall = time.perf_counter() - started
                study, _ = studies.load(name, storage)
                trials = study.get_trials(deepcopy=False)
                done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
                run = {"seed": seed, "pruner": pruner, "trials": len(done),
                       "pruned": sum(t.state.name == "PRUNED" for t in done),
                       "epochs": sum(int(t.user_attrs.get("epochs_run", 0)) for t in trials),
                       "wall_s": wall, "best_val_loss": study.best_value,
                       "best_val_accuracy": study.best_trial.user_attrs.get("val_accuracy"),
                       "stopped": summary.stopped_because}
                runs.append(run)
                print(f"seed {seed} {pruner:9s}: {run['epochs']} epochs, {wall:.1f}s, best "
                      f"{run['best_val_loss']:.4f} ({run['pruned']} pruned)", flush=True)
        storage.engine.dispose()

    rows, per_pruner = [], {}
    for pruner in PRUNERS:
        mine = [r for r in runs if r["pruner"] == pruner]
        base = {r["seed"]: r for r in runs if r["pruner"] == "none"}
        saving = [base[r["seed"]]["epochs"] / r["epochs"] for r in mine]
        loss_ratio = [r["best_val_loss"] / base[r["seed"]]["best_val_loss"] for r in mine]
        per_pruner[pruner] = {
            "epochs": spread([r["epochs"] for r in mine]),
            "wall_s": spread([r["wall_s"] for r in mine]),
            "best_val_loss": spread([r["best_val_loss"] for r in mine]),
            "epoch_saving_vs_none": statistics.fmean(saving),
            "best_val_loss_vs_none": statistics.fmean(loss_ratio),
            "goal_met": pruner == "none" or (statistics.fmean(saving) >= 3
                                             and statistics.fmean(loss_ratio) <= 1.02)}
        p = per_pruner[pruner]
        rows.append((pruner, len(mine), n_trials, p["epochs"]["mean"], p["wall_s"]["mean"],
                     p["best_val_loss"]["mean"], p["best_val_loss"]["std"],
                     p["epoch_saving_vs_none"], p["best_val_loss_vs_none"],
                     "-" if pruner == "none" else ("met" if p["goal_met"] else "missed")))
    t1 = table(["pruner", "seeds", "trials", "epochs (mean)", "wall s (mean)",
                "best val_loss (mean)", "best val_loss (std)", "epochs saved x",
                "best val_loss / none", "goal >=3x, <=1.02"], rows)
    t2 = table(["seed", "pruner", "trials", "pruned", "epochs", "wall s", "best val_loss",
                "best val_accuracy"],
               [(r["seed"], r["pruner"], r["trials"], r["pruned"], r["epochs"], r["wall_s"],
                 r["best_val_loss"], r["best_val_accuracy"]) for r in runs])
    write_result(args, "pruning", {"seeds": seeds, "n_trials": n_trials, "epochs": epochs,
                                   "runs": runs, "per_pruner": per_pruner}, [t1, t2])


if __name__ == "__main__":
    main()
