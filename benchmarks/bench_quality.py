"""Search quality against peers: equal epoch budgets, several seeds, two real datasets, and the
test loss of the model each tool itself picks.

Contenders, per dataset and seed, all building the identical network (``tuner.trial.
build_model``, the ``mlp`` family) on the identical splits and pipelines (``tuner.data``), with
the search space every one shares (dropout, L2 on a log scale, augmentation strength, learning
rate) and the same early-stopping patience:

* **tuner**: a study with ``epoch_budget = E`` and tuner's defaults (TPE, median pruning with
  its warm-up), run by ``tuner.worker.work``; it picks its best trial;
* **tuner-before**: the same with the defaults tuner had until 2026-12 (pruning after 5
  completed trials, TPE's first 10 trials at random whatever the budget), for an A/B of the
  change in one run;
* **tuner + confirm**: the same search stopped at 60 % of ``E``, then ``tuner confirm`` (top 2
  configurations, 2 new seeds each) within the rest of ``E``; it picks the best run of the
  confirmed winner;
* **plain Optuna**: the script a user writes by hand (``TPESampler``, ``MedianPruner``,
  optuna-integration's ``KerasPruningCallback`` on the unpenalized ``val_xent``), stopped once
  ``E`` epochs are spent;
* **KerasTuner Hyperband** (``factor=3``, ``max_epochs`` = the model's) and **RandomSearch**,
  stopped once ``E`` epochs are spent;
* **textbook**: the untuned recipe (dropout 0.5/0.3, L2 0.01, no augmentation), one run.

The harness counts every epoch any contender trains (a Keras callback in every fit; tuner's
reported epochs); no new trial starts once ``E`` is spent and a trial already training
finishes, for everyone. Each tool picks on validation; the picked model's test cross-entropy
and accuracy are what is compared. Noise: the test loss's spread when one configuration (the
tuner pick of seed 0) is retrained with 5 seeds; a per-seed difference smaller than that is a
tie. Wall time is the search alone (imports and data loading excluded, for everyone).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import parse_args, spread, table, throwaway_database, write_result
from _datasets import Dataset, datasets, merged_parts, study_file

CONTENDERS = ("tuner", "tuner-before", "tuner+confirm", "optuna", "kerastuner-hyperband",
              "kerastuner-random", "textbook")
PEERS = ("optuna", "kerastuner-hyperband", "kerastuner-random")
BUDGETS = {"digits": 150, "mnist-500": 300}  # epochs per search
CONFIRM_TOP, CONFIRM_SEEDS, SEARCH_SHARE = 2, 2, 0.6
NOISE_SEEDS = 5


class _Budget:
    """Counts the epochs every fit trains; tells a search when ``limit`` is spent."""

    def __init__(self, limit: int) -> None:
        self.limit, self.epochs = limit, 0
        self.on_spent: list[Any] = []

    @property
    def spent(self) -> bool:
        return self.epochs >= self.limit

    def callback(self) -> Any:
        import keras

        budget = self

        class _Count(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                budget.epochs += 1
                if budget.spent:
                    for stop in budget.on_spent:
                        stop()

        return _Count()


class _Setup:
    """One dataset's spec, arrays and pipelines, shared by every contender."""

    def __init__(self, ds: Dataset, tmp: Path, seed: int) -> None:
        from tuner.data import load_arrays, make_datasets
        from tuner.spec import load_spec

        self.ds = ds
        self.spec = load_spec(study_file(tmp / "spec", f"spec-{ds.name}", ds, seed=seed,
                                         n_trials=1))
        self.arrays = load_arrays(self.spec.data, seed=seed)
        self.data = make_datasets(self.arrays, ds.batch_size, seed=seed)

    def hyperparams(self, dropout: tuple[float, ...], l2: float, augment: float,
                    lr: float) -> Any:
        from tuner.space import Augmentation, Hyperparams

        return Hyperparams(dropout=dropout, l2=l2,
                           augmentation=Augmentation.from_strength(augment), learning_rate=lr,
                           input_shape=self.arrays.input_shape,
                           num_classes=self.arrays.num_classes)

    def model(self, hp: Any) -> Any:
        from tuner.trial import build_model

        return build_model(hp, self.spec, scale=self.arrays.scale)

    def stopper(self) -> Any:
        import keras

        return keras.callbacks.EarlyStopping(monitor="val_xent", mode="min",
                                             patience=self.ds.patience,
                                             restore_best_weights=True)

    def test(self, model: Any) -> tuple[float, float]:
        scores = model.evaluate(self.data.test, verbose=0, return_dict=True)
        return float(scores["xent"]), float(scores["accuracy"])


@contextlib.contextmanager
def _defaults_before() -> Iterator[None]:
    """tuner's defaults until 2026-12: 5 completed trials before pruning, and TPE's random
    start a quarter of ``n_trials`` (or of 40), at least 3: 10 for every epoch budget here."""
    from tuner import pruning
    from tuner import study as studies

    startup, expected = pruning.STARTUP_TRIALS, studies.expected_trials
    pruning.STARTUP_TRIALS = 5
    studies.expected_trials = lambda spec: spec.n_trials or 40
    try:
        yield
    finally:
        pruning.STARTUP_TRIALS, studies.expected_trials = startup, expected


def _run_tuner(url: str, tmp: Path, setup: _Setup, seed: int, budget: int,
               confirm: bool, label: str = "") -> dict[str, Any]:
    from tuner import confirm as confirming
    from tuner import study as studies
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.worker import work

    ds = setup.ds
    name = f"q-{ds.name}-{seed}-{'confirm' if confirm else 'plain'}{label}"
    search = round(budget * SEARCH_SHARE) if confirm else budget
    spec = load_spec(study_file(tmp, name, ds, seed=seed, epoch_budget=search))
    storage = open_storage(url)
    studies.create_or_resume(spec, storage, str(tmp / "artifacts"))
    started = time.perf_counter()
    work(storage, *studies.load(name, storage))
    if confirm:
        study, _ = studies.load(name, storage)
        queued = confirming.queue(study, storage, CONFIRM_TOP, CONFIRM_SEEDS)
        # The confirm runs grow the budget by their most epochs; hold the total at `budget`.
        rest = max(1, budget - queued.trials * ds.epochs)
        studies.create_or_resume(replace(spec, epoch_budget=rest), storage)
        work(storage, *studies.load(name, storage))
    wall = time.perf_counter() - started
    study, _ = studies.load(name, storage)
    trials = study.get_trials(deepcopy=False)
    pick = study.best_trial
    if confirm:
        ranked = [c for c in confirming.ranking(study) or [] if c.runs]
        by_number = {t.number: t for t in trials}
        pick = min((by_number[n] for n in ranked[0].runs), key=lambda t: t.value)
    storage.engine.dispose()
    return {"val_loss": pick.value, "test_loss": pick.user_attrs["test_loss"],
            "test_accuracy": pick.user_attrs["test_accuracy"],
            "epochs": sum(len(t.intermediate_values) for t in trials), "wall_s": wall,
            "trials": len(trials), "params": dict(pick.params)}


def _run_optuna(setup: _Setup, seed: int, budget: int) -> dict[str, Any]:
    """What a user writes by hand with Optuna and Keras."""
    import keras
    import optuna
    from optuna_integration import KerasPruningCallback

    counter = _Budget(budget)
    data = setup.data

    def objective(trial: optuna.Trial) -> float:
        keras.backend.clear_session()
        model = setup.model(setup.hyperparams(
            (trial.suggest_float("dropout", 0.0, 0.6),),
            trial.suggest_float("l2", 1e-6, 1e-1, log=True),
            trial.suggest_float("augment", 0.0, 0.6),
            trial.suggest_float("learning_rate", 3e-4, 3e-3, log=True)))
        history = model.fit(data.train, validation_data=data.val, epochs=setup.ds.epochs,
                            verbose=0, callbacks=[setup.stopper(), counter.callback(),
                                                  KerasPruningCallback(trial, "val_xent")])
        test_loss, test_accuracy = setup.test(model)
        trial.set_user_attr("test_loss", test_loss)
        trial.set_user_attr("test_accuracy", test_accuracy)
        return min(history.history["val_xent"])

    keras.utils.set_random_seed(seed)
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner())
    started = time.perf_counter()
    study.optimize(objective, callbacks=[lambda s, t: s.stop() if counter.spent else None])
    wall = time.perf_counter() - started
    pick = study.best_trial
    return {"val_loss": pick.value, "test_loss": pick.user_attrs["test_loss"],
            "test_accuracy": pick.user_attrs["test_accuracy"], "epochs": counter.epochs,
            "wall_s": wall, "trials": len(study.trials), "params": dict(pick.params)}


def _run_kerastuner(kind: str, tmp: Path, setup: _Setup, seed: int,
                    budget: int) -> dict[str, Any]:
    import keras
    import keras_tuner as kt

    def build(hp: Any) -> Any:
        return setup.model(setup.hyperparams(
            (hp.Float("dropout", 0.0, 0.6),), hp.Float("l2", 1e-6, 1e-1, sampling="log"),
            hp.Float("augment", 0.0, 0.6),
            hp.Float("learning_rate", 3e-4, 3e-3, sampling="log")))

    counter = _Budget(budget)
    keras.utils.set_random_seed(seed)
    common = {"objective": kt.Objective("val_xent", "min"), "seed": seed, "overwrite": True,
              "directory": str(tmp / "kt"), "project_name": f"{kind}-{setup.ds.name}-{seed}"}
    if kind == "hyperband":
        search = kt.Hyperband(build, max_epochs=setup.ds.epochs, factor=3,
                              hyperband_iterations=None, **common)
    else:
        search = kt.RandomSearch(build, max_trials=10**6, **common)

    def stop() -> None:  # no new trial once the budget is spent; the running one finishes
        search.oracle.max_trials = len(search.oracle.trials)

    counter.on_spent.append(stop)
    started = time.perf_counter()
    search.search(setup.data.train, validation_data=setup.data.val, epochs=setup.ds.epochs,
                  verbose=0, callbacks=[setup.stopper(), counter.callback()])
    wall = time.perf_counter() - started
    best = search.oracle.get_best_trials(1)[0]
    test_loss, test_accuracy = setup.test(search.get_best_models(1)[0])
    return {"val_loss": float(best.score), "test_loss": test_loss,
            "test_accuracy": test_accuracy, "epochs": counter.epochs, "wall_s": wall,
            "trials": len(search.oracle.trials), "params": dict(best.hyperparameters.values)}


def _train_once(setup: _Setup, seed: int, dropout: tuple[float, ...], l2: float,
                augment: float, lr: float) -> dict[str, Any]:
    import keras

    counter = _Budget(10**9)
    keras.utils.set_random_seed(seed)
    keras.backend.clear_session()
    model = setup.model(setup.hyperparams(dropout, l2, augment, lr))
    started = time.perf_counter()
    history = model.fit(setup.data.train, validation_data=setup.data.val,
                        epochs=setup.ds.epochs, verbose=0,
                        callbacks=[setup.stopper(), counter.callback()])
    wall = time.perf_counter() - started
    test_loss, test_accuracy = setup.test(model)
    return {"val_loss": min(history.history["val_xent"]), "test_loss": test_loss,
            "test_accuracy": test_accuracy, "epochs": counter.epochs, "wall_s": wall,
            "trials": 1}


def _run_textbook(setup: _Setup, seed: int) -> dict[str, Any]:
    return {**_train_once(setup, seed, (0.5, 0.3), 0.01, 0.0, 1e-3),
            "params": {"dropout": [0.5, 0.3], "l2": 0.01, "augment": 0.0,
                       "learning_rate": 1e-3}}


def _noise(setup: _Setup, params: dict[str, Any], seeds: int) -> dict[str, Any]:
    """Retrain one configuration with several seeds: how far do its losses move?"""
    runs = [_train_once(setup, 1000 + s, (params["dropout"],), params["l2"],
                        params["augment"], params["learning_rate"]) for s in range(seeds)]
    return {"params": params, "test_loss": spread([r["test_loss"] for r in runs]),
            "val_loss": spread([r["val_loss"] for r in runs])}


def _available() -> tuple[list[str], dict[str, str]]:
    """The contenders that can run here; KerasTuner is an optional extra (``.[bench]``)."""
    import importlib.util

    missing = [m for m in ("keras_tuner", "tensorboard") if importlib.util.find_spec(m) is None]
    if not missing:
        return list(CONTENDERS), {}
    reason = f"{', '.join(missing)} not installed: pip install -e '.[bench]'"
    print(f"skipping KerasTuner: {reason}", flush=True)
    return ([c for c in CONTENDERS if not c.startswith("kerastuner")],
            {c: reason for c in CONTENDERS if c.startswith("kerastuner")})


def main() -> None:
    args = parse_args(__doc__, lambda p: (
        p.add_argument("--seeds", type=int, default=5),
        p.add_argument("--first-seed", type=int, default=0,
                       help="seeds first-seed .. first-seed + seeds - 1: to split a run"),
        p.add_argument("--datasets", nargs="+"),
        p.add_argument("--contenders", nargs="+", choices=CONTENDERS),
        p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                       help="instead: the tables of several runs' quality.json together")))
    if args.merge:
        _merge(args)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import optuna

    from tuner.tfsetup import init_tensorflow

    init_tensorflow()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    contenders, skipped = _available()
    if args.contenders:
        contenders = [c for c in contenders if c in args.contenders or c == "tuner"]
    seeds = [0] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    data = datasets(args.out / "data", args.datasets)
    budgets = {d.name: (12 if args.quick else BUDGETS[d.name]) for d in data}
    runs: list[dict[str, Any]] = []
    noise: dict[str, Any] = {}
    with throwaway_database("tuner_bench_quality") as url, \
            tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp_name:
        tmp = Path(tmp_name)
        for ds in data:
            if args.quick:
                ds = replace(ds, epochs=2, patience=1)
            budget = budgets[ds.name]
            for seed in seeds:
                for contender in contenders:
                    # Fresh pipelines for each: a shared one would hand each contender the
                    # shuffle order left by the epochs of those before it.
                    setup = _Setup(ds, tmp, seed)
                    if contender == "tuner-before":
                        with _defaults_before():
                            r = _run_tuner(url, tmp, setup, seed, budget, confirm=False,
                                           label="before")
                    elif contender.startswith("tuner"):
                        r = _run_tuner(url, tmp, setup, seed, budget,
                                       confirm=contender == "tuner+confirm")
                    elif contender.startswith("kerastuner"):
                        r = _run_kerastuner(contender.split("-")[1], tmp, setup, seed, budget)
                    elif contender == "optuna":
                        r = _run_optuna(setup, seed, budget)
                    else:
                        r = _run_textbook(setup, seed)
                    runs.append({"dataset": ds.name, "seed": seed, "contender": contender,
                                 "budget": budget, **r})
                    print(f"{ds.name} seed {seed} {contender:21s}: test {r['test_loss']:.4f} "
                          f"(acc {r['test_accuracy']:.4f}), val {r['val_loss']:.4f}, "
                          f"{r['epochs']} epochs, {r['trials']} trials, {r['wall_s']:.1f}s",
                          flush=True)
                if seed == seeds[0]:  # the noise yardstick first, so every partial has one
                    pick = next(r for r in runs if r["dataset"] == ds.name
                                and r["seed"] == seed and r["contender"] == "tuner")
                    noise[ds.name] = _noise(_Setup(ds, tmp, seed), pick["params"],
                                            2 if args.quick else NOISE_SEEDS)
                    print(f"{ds.name}: retraining tuner's pick with {NOISE_SEEDS} seeds: test "
                          f"loss std {noise[ds.name]['test_loss']['std']:.4f}", flush=True)
                # Written after every seed: a run cut short still leaves its complete seeds.
                done = [d for d in data if d.name in noise]
                summary, goal, paired = _summarize(runs, noise, contenders, done)
                write_result(args, "quality", {
                    "seeds": sorted({r["seed"] for r in runs}), "seeds_asked": seeds,
                    "budgets": budgets, "runs": runs, "summary": summary, "goal": goal,
                    "paired": paired, "noise": noise, "skipped": skipped},
                    _tables(runs, summary, goal, paired, noise, contenders, done))


def _merge(args: Any) -> None:
    """One set of tables from runs split by dataset or seed (each its own process): the
    runs together; for each dataset, the noise yardstick of the part with its lowest seed."""
    parts, runs, data = merged_parts(args.merge, args.out / "data")
    noise: dict[str, Any] = {}
    for part in sorted(parts, key=lambda part: min(part["seeds"]), reverse=True):
        noise.update(part["noise"])
    contenders = list(dict.fromkeys(r["contender"] for r in runs))
    summary, goal, paired = _summarize(runs, noise, contenders, data)
    write_result(args, "quality", {
        "merged": [str(p) for p in args.merge], "commands": [p["command"] for p in parts],
        "seeds": sorted({r["seed"] for r in runs}),
        "budgets": {k: v for part in parts for k, v in part["budgets"].items()},
        "runs": runs, "summary": summary, "goal": goal, "paired": paired, "noise": noise,
        "skipped": parts[0]["skipped"]},
        _tables(runs, summary, goal, paired, noise, contenders, data))


def _summarize(runs: list[dict[str, Any]], noise: dict[str, Any], contenders: list[str],
               data: list[Dataset]) -> tuple[dict, dict, dict]:
    summary: dict[str, dict[str, Any]] = {}
    goal: dict[str, dict[str, Any]] = {}
    paired: dict[str, dict[str, Any]] = {}
    for ds in data:
        mine = [r for r in runs if r["dataset"] == ds.name]
        summary[ds.name] = {c: {k: spread([r[k] for r in mine if r["contender"] == c])
                                for k in ("test_loss", "test_accuracy", "val_loss", "epochs",
                                          "wall_s", "trials")}
                            for c in contenders}
        s = summary[ds.name]
        threshold = noise[ds.name]["test_loss"]["std"]
        tuner = {r["seed"]: r for r in mine if r["contender"] == "tuner"}
        for peer in (c for c in contenders if c in PEERS or c == "tuner-before"):
            diffs = [tuner[r["seed"]]["test_loss"] - r["test_loss"] for r in mine
                     if r["contender"] == peer]
            paired[f"{ds.name} vs {peer}"] = {
                "wins": sum(d < -threshold for d in diffs),
                "ties": sum(abs(d) <= threshold for d in diffs),
                "losses": sum(d > threshold for d in diffs),
                "mean_difference": statistics.fmean(diffs), "noise": threshold}
            if peer not in PEERS:
                continue
            goal[f"{ds.name} vs {peer}"] = {
                "test_loss_at_least_as_good":
                    s["tuner"]["test_loss"]["mean"] <= s[peer]["test_loss"]["mean"],
                "no_more_wall_time": s["tuner"]["wall_s"]["mean"] <= s[peer]["wall_s"]["mean"],
                "tuner_test_loss": s["tuner"]["test_loss"]["mean"],
                "peer_test_loss": s[peer]["test_loss"]["mean"],
                "tuner_wall_s": s["tuner"]["wall_s"]["mean"],
                "peer_wall_s": s[peer]["wall_s"]["mean"]}
    return summary, goal, paired


def _tables(runs: list[dict[str, Any]], summary: dict, goal: dict, paired: dict,
            noise: dict, contenders: list[str], data: list[Dataset]) -> list[str]:
    rows = []
    for ds in data:
        for c in contenders:
            s = summary[ds.name][c]
            rows.append((ds.name, c, s["test_loss"]["n"],
                         f"{s['test_loss']['mean']:.4f} ± {s['test_loss']['std']:.4f}",
                         f"{s['test_accuracy']['mean']:.4f} ± {s['test_accuracy']['std']:.4f}",
                         f"{s['val_loss']['mean']:.4f}", s["epochs"]["mean"],
                         s["trials"]["mean"], s["wall_s"]["mean"]))
    t1 = table(["dataset", "contender", "seeds", "test loss of its pick (mean ± std)",
                "test accuracy", "val_loss of its pick", "epochs", "trials", "wall s"], rows)
    t2 = table(["comparison", "tuner wins", "ties", "losses", "mean test-loss difference",
                "noise (retraining std)"],
               [(k, p["wins"], p["ties"], p["losses"], p["mean_difference"], p["noise"])
                for k, p in paired.items()])
    t3 = table(["dataset", "retrained configuration", "seeds", "test loss std",
                "val_loss std"],
               [(name, ", ".join(f"{k} {v:.3g}" for k, v in n["params"].items()),
                 n["test_loss"]["n"], n["test_loss"]["std"], n["val_loss"]["std"])
                for name, n in noise.items()])
    t4 = table(["goal", "tuner test loss", "peer test loss", "met", "tuner wall s",
                "peer wall s", "met"],
               [(k, g["tuner_test_loss"], g["peer_test_loss"],
                 "met" if g["test_loss_at_least_as_good"] else "missed", g["tuner_wall_s"],
                 g["peer_wall_s"], "met" if g["no_more_wall_time"] else "missed")
                for k, g in goal.items()])
    t5 = table(["dataset", "seed", "contender", "test loss", "test accuracy", "val_loss",
                "epochs", "trials", "wall s"],
               [(r["dataset"], r["seed"], r["contender"], r["test_loss"], r["test_accuracy"],
                 r["val_loss"], r["epochs"], r["trials"], r["wall_s"]) for r in runs])
    return [t1, t2, t3, t4, t5]


if __name__ == "__main__":
    main()
