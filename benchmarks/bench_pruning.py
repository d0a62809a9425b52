"""Pruning: how many epochs does each pruner setting save, and what does it cost in quality?

The same search (TPE, seeded, the shared search space, the ``mlp`` family) on two real
datasets (``_datasets.py``), run to the same number of trials by ``tuner.worker.work`` with
each pruner setting below, several seeds each. Per search: epochs trained (every reported epoch
of every trial), wall time, the best validation loss, and the test loss of the model the search
picks (its best trial). Goal: >= 3x fewer epochs than no pruning, for a best val_loss no more
than 2 % worse.

Settings tried: no pruning; the median rule with tuner's default warm-up (a quarter of the
epochs); tuner's trend rule (the median rule that spares a trial whose gains are not shrinking,
warm-up 1); the median and the 25th percentile after 1 epoch; the patient median (no stop while
the trial still improves); Hyperband and successive halving from the first epoch and after 1
epoch. 24 trials a search: with 5 unpruned startup trials, even a pruner that stopped every
other trial after 2 epochs would save at most 24 x E / (5 x E + 19 x 2), 3.2x at E = 15.
Wilcoxon is not run here: Optuna's WilcoxonPruner compares a trial's scores on the same
*instances* as the best trial's, and epochs of one training run are not exchangeable instances.
``replay_pruning.py`` replays it on the unpruned searches' curves instead.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import parse_args, spread, table, throwaway_database, write_result
from _datasets import datasets, merged_parts, study_file

# (label, pruner, pruner_warmup, startup trials): None = tuner's default
SETTINGS = [("none", "none", None, None), ("median (default warm-up)", "median", None, None),
            ("median, 5 startup trials (the default until 2026-12)", "median", None, 5),
            ("trend (warm-up 1)", "trend", None, None), ("median, warm-up 1", "median", 1, None),
            ("percentile 25, warm-up 1", "percentile", 1, None),
            ("patient median", "patient", None, None),
            ("hyperband, warm-up 0", "hyperband", 0, None),
            ("successive halving, warm-up 0", "successive-halving", 0, None),
            ("successive halving, warm-up 1", "successive-halving", 1, None)]


def main() -> None:
    args = parse_args(__doc__, lambda p: (
        p.add_argument("--seeds", type=int, default=3),
        p.add_argument("--first-seed", type=int, default=0,
                       help="seeds first-seed .. first-seed + seeds - 1: to split a run"),
        p.add_argument("--trials", type=int, default=24),
        p.add_argument("--datasets", nargs="+"),
        p.add_argument("--settings", nargs="+",
                       help="labels to run (default: all); a setting is compared with the "
                            "'none' run of its seed, in this run or in one merged with it"),
        p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                       help="instead: the tables of several runs' pruning.json together")))
    if args.merge:
        parts, runs, data = merged_parts(args.merge, args.out / "data")
        _report(args, runs, data, parts[0]["n_trials"],
                {"merged": [str(p) for p in args.merge],
                 "commands": [part["command"] for part in parts]})
        return
    seeds = [0] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    n_trials = 3 if args.quick else args.trials
    settings = SETTINGS[:2] if args.quick else [
        s for s in SETTINGS if not args.settings or s[0] in args.settings]
    import optuna

    from tuner import study as studies
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.tfsetup import init_tensorflow
    from tuner.worker import work

    init_tensorflow()  # imported before the clock starts, as for every other search
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = []
    data = datasets(args.out / "data", args.datasets)
    with throwaway_database("tuner_bench_pruning") as url, \
            tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        storage = open_storage(url)
        for ds in data:
            for seed in seeds:
                for label, pruner, warmup, startup in settings:
                    name = f"{ds.name}-{pruner}-{warmup}-{startup}-{seed}"
                    spec = load_spec(study_file(Path(tmp), name, ds, seed=seed, pruner=pruner,
                                                n_trials=n_trials, pruner_warmup=warmup))
                    if args.quick:
                        spec = _quick(spec)
                    studies.create_or_resume(spec, storage, str(Path(tmp) / "art"))
                    started = time.perf_counter()
                    with _startup_trials(startup):
                        work(storage, *studies.load(name, storage))
                    wall = time.perf_counter() - started
                    study, _ = studies.load(name, storage)
                    trials = study.get_trials(deepcopy=False)
                    best = study.best_trial
                    run = {"dataset": ds.name, "seed": seed, "setting": label,
                           "trials": len(trials),
                           "pruned": sum(t.state.name == "PRUNED" for t in trials),
                           "epochs": sum(len(t.intermediate_values) for t in trials),
                           "wall_s": wall, "best_val_loss": best.value,
                           "test_loss": best.user_attrs.get("test_loss"),
                           # every trial's curve, so other rules can be replayed offline
                           "curves": [_curve(t) for t in trials]}
                    runs.append(run)
                    print(f"{ds.name} seed {seed} {label:26s}: {run['epochs']:4d} epochs, "
                          f"{wall:6.1f}s, best val {best.value:.4f}, test "
                          f"{run['test_loss']:.4f} ({run['pruned']} pruned)", flush=True)
                # after every seed: a run cut short keeps the seeds it finished
                _report(args, runs, data, n_trials, {})
        storage.engine.dispose()


def _report(args: Any, runs: list[dict[str, Any]], data: list[Any], n_trials: int,
            extra: dict[str, Any]) -> None:
    labels = [s[0] for s in SETTINGS if any(r["setting"] == s[0] for r in runs)]

    rows, per_setting = [], {}
    for ds in data:
        base = {r["seed"]: r for r in runs if r["dataset"] == ds.name and r["setting"] == "none"}
        for label in labels:
            mine = [r for r in runs if r["dataset"] == ds.name and r["setting"] == label
                    and r["seed"] in base]
            if not mine:
                continue
            saving = statistics.fmean(base[r["seed"]]["epochs"] / r["epochs"] for r in mine)
            ratio = statistics.fmean(r["best_val_loss"] / base[r["seed"]]["best_val_loss"]
                                     for r in mine)
            test_ratio = statistics.fmean(r["test_loss"] / base[r["seed"]]["test_loss"]
                                          for r in mine)
            p = {"epochs": spread([r["epochs"] for r in mine]),
                 "wall_s": spread([r["wall_s"] for r in mine]),
                 "best_val_loss": spread([r["best_val_loss"] for r in mine]),
                 "test_loss": spread([r["test_loss"] for r in mine]),
                 "epoch_saving_vs_none": saving, "best_val_loss_vs_none": ratio,
                 "test_loss_vs_none": test_ratio,
                 "goal_met": label == "none" or (saving >= 3 and ratio <= 1.02)}
            per_setting[f"{ds.name}: {label}"] = p
            rows.append((ds.name, label, len(mine), p["epochs"]["mean"], p["wall_s"]["mean"],
                         p["best_val_loss"]["mean"], p["test_loss"]["mean"], saving, ratio,
                         test_ratio, "-" if label == "none" else
                         ("met" if p["goal_met"] else "missed")))
    t1 = table(["dataset", "pruner", "seeds", "epochs (mean)", "wall s (mean)",
                "best val_loss (mean)", "test loss of pick (mean)", "epochs saved x",
                "best val_loss / none", "test loss / none", "goal >=3x, <=1.02"], rows)
    t2 = table(["dataset", "seed", "pruner", "trials", "pruned", "epochs", "wall s",
                "best val_loss", "test loss"],
               [(r["dataset"], r["seed"], r["setting"], r["trials"], r["pruned"], r["epochs"],
                 r["wall_s"], r["best_val_loss"], r["test_loss"]) for r in runs])
    default = {k: v for k, v in per_setting.items() if k.endswith("median (default warm-up)")}
    write_result(args, "pruning", {**extra, "seeds": sorted({r["seed"] for r in runs}),
                                   "n_trials": n_trials,
                                   "datasets": [d.name for d in data], "runs": runs,
                                   "per_setting": per_setting, "default": default},
                 [t1, t2])


@contextlib.contextmanager
def _startup_trials(n: int | None) -> Iterator[None]:
    """The pruners' completed trials before any pruning, for the settings that compare it."""
    from tuner import pruning

    default = pruning.STARTUP_TRIALS
    pruning.STARTUP_TRIALS = default if n is None else n
    try:
        yield
    finally:
        pruning.STARTUP_TRIALS = default


def _curve(trial: Any) -> dict[str, Any]:
    return {"number": trial.number, "state": trial.state.name,
            "val_loss": [trial.intermediate_values[s] for s in sorted(trial.intermediate_values)],
            "test_loss": trial.user_attrs.get("test_loss"), "params": dict(trial.params)}


def _quick(spec):  # noqa: ANN001, ANN202
    """Two epochs on 200 images: checks the script runs, nothing more."""
    from dataclasses import replace

    return replace(spec, data=replace(spec.data, limit=200),
                   model=replace(spec.model, epochs=2, patience=1))


if __name__ == "__main__":
    main()
