"""Epoch-start stalls: wall time and CPU use of every epoch of a 20-epoch tuner trial.

Two trials run back to back in one process, as a worker runs them (the data and ``tf.data``
pipelines are built once and reused): the first pays for graph tracing, the second is the
steady state. Each epoch's end is stamped where tuner reports it to Optuna (``trial.report``),
with the process's CPU seconds from ``os.times()``. Goal: after the first epoch, no epoch
slower than 1.5x the median epoch.

A control follows in the same process: the same network (``build_model`` with the same
hyperparameters), the same ``tf.data`` pipelines and epochs, trained by a plain
``model.fit`` with only a timing callback (no Optuna, no storage). If it shows the same worst
epochs, they come from Keras/TensorFlow on this host, not from tuner.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import parse_args, study_file, table, throwaway_database, write_result

FIXED = {"dropout": "0.2", "l2": "1e-4", "augment": "0.3", "learning_rate": "1e-3"}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _walls(marks: list[tuple[float, float]]) -> list[float]:
    return [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)]


def _cpus(marks: list[tuple[float, float]]) -> list[float]:
    ncpu = os.cpu_count() or 1
    return [(b[1] - a[1]) / max(b[0] - a[0], 1e-9) / ncpu
            for a, b in zip(marks, marks[1:], strict=False)]


def main() -> None:
    args = parse_args(__doc__)
    epochs, n_trials, limit = (4, 2, 300) if args.quick else (20, 2, None)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tuner import study as studies
    from tuner.budget import Claimer
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.tfsetup import init_tensorflow
    from tuner.worker import artifact_store

    init_tensorflow()
    import keras

    from tuner.data import load_arrays, make_datasets
    from tuner.space import from_params
    from tuner.trial import build_model, run_trial, with_shape

    trials = []
    with throwaway_database("tuner_bench_epochs") as url, \
            tempfile.TemporaryDirectory(prefix="bench-epochs-") as tmp:
        path = study_file(Path(tmp), "epochs", n_trials=n_trials, epochs=epochs,
                          pruner="none", sampler="random", patience=epochs, limit=limit,
                          search=FIXED)
        storage = open_storage(url)
        spec = load_spec(path)
        studies.create_or_resume(spec, storage, str(Path(tmp) / "artifacts"))
        study, spec = studies.load(spec.name, storage)
        arrays = load_arrays(spec.data, seed=spec.seed or 0)
        datasets = make_datasets(arrays, spec.model.batch_size, seed=spec.seed or 0)
        store = artifact_store(study, None)
        for _ in range(n_trials):
            trial = Claimer(study, storage).claim().trial
            marks = [(time.perf_counter(), _cpu())]
            report = trial.report

            def stamped(value: float, step: int, report=report, marks=marks) -> None:
                marks.append((time.perf_counter(), _cpu()))
                report(value, step)

            trial.report = stamped  # type: ignore[method-assign]
            result = run_trial(trial, spec, arrays, datasets, store)
            study.tell(trial, result.val_loss)
            walls, cpus = _walls(marks), _cpus(marks)
            trials.append({"number": trial.number, "epoch_seconds": walls,
                           "cpu_utilisation": cpus, "epochs_run": result.epochs_run})
        hp = with_shape(from_params(study.best_trial.params, spec), arrays)
        storage.engine.dispose()
        for _ in range(n_trials):  # the control: plain model.fit, same network and pipelines
            marks = [(time.perf_counter(), _cpu())]
            stamp = keras.callbacks.LambdaCallback(
                on_epoch_end=lambda *_, marks=marks: marks.append((time.perf_counter(), _cpu())))
            model = build_model(hp, spec, seed=spec.seed)
            model.fit(datasets[0], validation_data=datasets[1], epochs=epochs, verbose=0,
                      callbacks=[stamp])
            trials.append({"number": "bare fit", "epoch_seconds": _walls(marks),
                           "cpu_utilisation": _cpus(marks), "epochs_run": epochs})
            keras.backend.clear_session()

    rows, summary = [], []
    for t in trials:
        later = t["epoch_seconds"][1:]
        median = statistics.median(later)
        worst = max(later)
        worst_at = later.index(worst) + 2
        t.update(median_after_first=median, worst_after_first=worst, worst_epoch=worst_at,
                 worst_over_median=worst / median, first_epoch=t["epoch_seconds"][0],
                 goal_met=worst / median <= 1.5)
        summary.append((t["number"], t["first_epoch"], median, worst, worst_at,
                        worst / median, statistics.fmean(t["cpu_utilisation"][1:]) * 100,
                        "met" if t["goal_met"] else "missed"))
        for i, (w, c) in enumerate(zip(t["epoch_seconds"], t["cpu_utilisation"],
                                       strict=True)):
            rows.append((t["number"], i + 1, w, c * 100))
    t1 = table(["trial", "first epoch s", "median epoch s (after 1st)", "worst s",
                "worst epoch #", "worst / median", "CPU % (of all cores)", "goal <= 1.5x"],
               summary)
    t2 = table(["trial", "epoch", "wall s", "CPU % (of all cores)"], rows)
    ours = [t for t in trials if t["number"] != "bare fit"]
    bare = [t for t in trials if t["number"] == "bare fit"]
    write_result(args, "epochs", {
        "epochs": epochs, "trials": trials, "goal_met": all(t["goal_met"] for t in ours),
        "worst_over_median": max(t["worst_over_median"] for t in ours),
        "bare_worst_over_median": max(t["worst_over_median"] for t in bare)}, [t1, t2])


if __name__ == "__main__":
    main()
