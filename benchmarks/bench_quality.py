"""Search quality against peers at the same model family, search space and epoch budget.

Contenders, per seed, on the digits data with the ``mlp`` family and the search space of
``studies/digits_demo.toml`` (dropout, L2 on a log scale, augmentation strength, learning
rate), each allowed ``N`` trials of at most ``E`` epochs (a budget of ``N x E`` epochs):

* **tuner**: a tuner study on PostgreSQL (TPE + median pruner, the demo's settings), run by
  ``tuner.worker.work``;
* **KerasTuner Hyperband** (``max_epochs=E``, ``factor=3``, one iteration) and
  **KerasTuner RandomSearch** (``max_trials=N``);
* **plain Optuna**: the script a user would write by hand (in-memory study, default
  ``TPESampler`` and ``MedianPruner``, ``optuna_integration.KerasPruningCallback``);
* **textbook floor**: the untuned recipe, dropout 0.5/0.3 and L2 0.01, no augmentation.

Every contender builds the identical network with ``tuner.trial.build_model``, trains on the
same ``tf.data`` pipelines, early-stops with the same patience, and is scored the same way:
the best epoch's *unpenalized* validation cross-entropy (the compiled ``xent`` metric; Keras'
``val_loss`` adds the L2 penalty and would favour low L2), with its validation accuracy.
Wall time is the search alone (imports and data loading excluded, for everyone).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import parse_args, spread, study_file, table, throwaway_database, write_result

CONTENDERS = ("tuner", "kerastuner-hyperband", "kerastuner-random", "optuna", "textbook")


class _Budget:
    """Counts epochs and keeps the best (val_xent, val_accuracy) seen by any fit."""

    def __init__(self) -> None:
        self.epochs = 0
        self.best: tuple[float, float] = (float("inf"), 0.0)

    def callback(self) -> Any:
        import keras

        budget = self

        class _Record(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                logs = logs or {}
                budget.epochs += 1
                score = (float(logs.get("val_xent", float("inf"))),
                         float(logs.get("val_accuracy", 0.0)))
                if score[0] < budget.best[0]:
                    budget.best = score

        return _Record()


def _hyperparams(dropout: tuple[float, ...], l2: float, augment: float, lr: float,
                 arrays: Any) -> Any:
    from tuner.space import Augmentation, Hyperparams

    return Hyperparams(dropout=dropout, l2=l2, augmentation=Augmentation.from_strength(augment),
                       learning_rate=lr, input_shape=arrays.input_shape,
                       num_classes=arrays.num_classes)


def _stopper(patience: int) -> Any:
    import keras

    return keras.callbacks.EarlyStopping(monitor="val_xent", mode="min", patience=patience,
                                         restore_best_weights=True)


def _run_tuner(url: str, tmp: Path, seed: int, n: int, epochs: int, patience: int,
               limit: int | None) -> dict[str, Any]:
    from tuner import study as studies
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.worker import work

    name = f"quality-{seed}"
    path = study_file(tmp, name, n_trials=n, epochs=epochs, pruner="median", sampler="tpe",
                      seed=seed, patience=patience, limit=limit)
    storage = open_storage(url)
    studies.create_or_resume(load_spec(path), storage, str(tmp / "artifacts"))
    started = time.perf_counter()
    work(storage, name)
    wall = time.perf_counter() - started
    study, _ = studies.load(name, storage)
    used = sum(int(t.user_attrs.get("epochs_run", 0)) for t in study.get_trials(deepcopy=False))
    result = {"best_val_loss": study.best_value,
              "best_val_accuracy": study.best_trial.user_attrs["val_accuracy"],
              "epochs": used, "wall_s": wall}
    storage.engine.dispose()
    return result


def _run_kerastuner(kind: str, tmp: Path, seed: int, n: int, epochs: int, patience: int,
                    spec: Any, arrays: Any, datasets: Any) -> dict[str, Any]:
    import keras
    import keras_tuner as kt

    from tuner.trial import build_model

    def build(hp: Any) -> Any:
        return build_model(_hyperparams(
            (hp.Float("dropout", 0.0, 0.6),), hp.Float("l2", 1e-6, 1e-1, sampling="log"),
            hp.Float("augment", 0.0, 0.6), hp.Float("learning_rate", 3e-4, 3e-3,
                                                    sampling="log"), arrays), spec)

    budget = _Budget()
    keras.utils.set_random_seed(seed)
    common = {"objective": kt.Objective("val_xent", "min"), "seed": seed, "overwrite": True,
              "directory": str(tmp / "kt"), "project_name": f"{kind}-{seed}"}
    if kind == "hyperband":
        search = kt.Hyperband(build, max_epochs=epochs, factor=3, hyperband_iterations=1,
                              **common)
    else:
        search = kt.RandomSearch(build, max_trials=n, **common)
    train, val = datasets
    started = time.perf_counter()
    search.search(train, validation_data=val, epochs=epochs, verbose=0,
                  callbacks=[_stopper(patience), budget.callback()])
    wall = time.perf_counter() - started
    return {"best_val_loss": budget.best[0], "best_val_accuracy": budget.best[1],
            "epochs": budget.epochs, "wall_s": wall,
            "kt_best_score": search.oracle.get_best_trials(1)[0].score}


def _run_optuna(seed: int, n: int, epochs: int, patience: int, spec: Any, arrays: Any,
                datasets: Any) -> dict[str, Any]:
    """What a user writes by hand with Optuna and Keras."""
    import keras
    import optuna
    from optuna_integration import KerasPruningCallback

    from tuner.trial import build_model

    budget = _Budget()
    train, val = datasets

    def objective(trial: optuna.Trial) -> float:
        keras.backend.clear_session()
        model = build_model(_hyperparams(
            (trial.suggest_float("dropout", 0.0, 0.6),),
            trial.suggest_float("l2", 1e-6, 1e-1, log=True),
            trial.suggest_float("augment", 0.0, 0.6),
            trial.suggest_float("learning_rate", 3e-4, 3e-3, log=True), arrays), spec)
        history = model.fit(train, validation_data=val, epochs=epochs, verbose=0,
                            callbacks=[_stopper(patience), budget.callback(),
                                       KerasPruningCallback(trial, "val_xent")])
        return min(history.history["val_xent"])

    keras.utils.set_random_seed(seed)
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner())
    started = time.perf_counter()
    study.optimize(objective, n_trials=n)
    wall = time.perf_counter() - started
    return {"best_val_loss": budget.best[0], "best_val_accuracy": budget.best[1],
            "epochs": budget.epochs, "wall_s": wall}


def _run_textbook(seed: int, epochs: int, patience: int, spec: Any, arrays: Any,
                  datasets: Any) -> dict[str, Any]:
    import keras

    from tuner.trial import build_model

    budget = _Budget()
    keras.utils.set_random_seed(seed)
    keras.backend.clear_session()
    model = build_model(_hyperparams((0.5, 0.3), 0.01, 0.0, 1e-3, arrays), spec)
    train, val = datasets
    started = time.perf_counter()
    model.fit(train, validation_data=val, epochs=epochs, verbose=0,
              callbacks=[_stopper(patience), budget.callback()])
    return {"best_val_loss": budget.best[0], "best_val_accuracy": budget.best[1],
            "epochs": budget.epochs, "wall_s": time.perf_counter() - started}


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
    args = parse_args(__doc__, lambda p: p.add_argument("--seeds", type=int))
    if args.quick:
        seeds, n, epochs, patience, limit = [0], 2, 2, 1, 200
    else:
        seeds, n, epochs, patience, limit = [0, 1], 12, 15, 5, None
    if args.seeds:
        seeds = list(range(args.seeds))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import optuna

    from tuner.tfsetup import init_tensorflow

    init_tensorflow()
    from tuner.data import load_arrays, make_datasets
    from tuner.spec import load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    contenders, skipped = _available()
    runs: list[dict[str, Any]] = []
    with throwaway_database("tuner_bench_quality") as url, \
            tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp_name:
        tmp = Path(tmp_name)
        for seed in seeds:
            spec = load_spec(study_file(tmp / "spec", f"spec-{seed}", n_trials=n,
                                        epochs=epochs, seed=seed, patience=patience,
                                        limit=limit))
            arrays = load_arrays(spec.data, seed=seed)
            datasets = make_datasets(arrays, spec.model.batch_size, seed=seed)
            for contender in contenders:
                if contender == "tuner":
                    r = _run_tuner(url, tmp, seed, n, epochs, patience, limit)
                elif contender.startswith("kerastuner"):
                    r = _run_kerastuner(contender.split("-")[1], tmp, seed, n, epochs,
                                        patience, spec, arrays, datasets)
                elif contender == "optuna":
                    r = _run_optuna(seed, n, epochs, patience, spec, arrays, datasets)
                else:
                    r = _run_textbook(seed, epochs, patience, spec, arrays, datasets)
                runs.append({"seed": seed, "contender": contender, **r})
                print(f"seed {seed} {contender:21s}: best val_loss {r['best_val_loss']:.4f}, "
                      f"val_acc {r['best_val_accuracy']:.4f}, {r['epochs']} epochs, "
                      f"{r['wall_s']:.1f}s", flush=True)

    summary, rows = {}, []
    for c in contenders:
        mine = [r for r in runs if r["contender"] == c]
        summary[c] = {k: spread([r[k] for r in mine])
                      for k in ("best_val_loss", "best_val_accuracy", "epochs", "wall_s")}
        s = summary[c]
        rows.append((c, len(mine), s["best_val_loss"]["mean"], s["best_val_loss"]["std"],
                     s["best_val_accuracy"]["mean"], s["best_val_accuracy"]["std"],
                     s["epochs"]["mean"], s["wall_s"]["mean"]))
    peers = [c for c in contenders if c not in ("tuner", "textbook")]
    tuner_loss = summary["tuner"]["best_val_loss"]["mean"]
    tuner_wall = summary["tuner"]["wall_s"]["mean"]
    goal = {c: {"loss_at_least_as_good": tuner_loss <= summary[c]["best_val_loss"]["mean"],
                "less_wall_time": tuner_wall < summary[c]["wall_s"]["mean"]} for c in peers}
    t1 = table(["contender", "seeds", "best val_loss mean", "std", "val_accuracy mean", "std",
                "epochs used (mean)", "wall s (mean)"], rows)
    t2 = table(["seed", "contender", "best val_loss", "val_accuracy", "epochs", "wall s"],
               [(r["seed"], r["contender"], r["best_val_loss"], r["best_val_accuracy"],
                 r["epochs"], r["wall_s"]) for r in runs])
    t3 = table(["peer", "tuner val_loss <= peer", "tuner wall < peer"],
               [(c, "met" if g["loss_at_least_as_good"] else "missed",
                 "met" if g["less_wall_time"] else "missed") for c, g in goal.items()])
    write_result(args, "quality", {"seeds": seeds, "n_trials": n, "epochs": epochs,
                                   "patience": patience, "epoch_budget": n * epochs,
                                   "runs": runs, "summary": summary, "goal": goal,
                                   "skipped": skipped},
                 [t1, t2, t3])


if __name__ == "__main__":
    main()
