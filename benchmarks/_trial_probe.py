"""One tuner trial, phase by phase, through tuner's public functions (for bench_overhead).

It does what ``tuner run`` does for a one-trial study (open the storage, create the study,
load the data once, claim a trial under the budget lock, run it, tell it) and stamps the wall
clock between phases. Every SQL statement is counted and timed with SQLAlchemy's engine events,
so "storage round trips" is measured, not estimated. Prints ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import time

T_MAIN = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _SqlClock:
    """Counts statements and seconds spent in the database, per phase."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.count: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._start: dict[int, float] = {}

    def attach(self, engine) -> None:  # noqa: ANN001
        from sqlalchemy import event

        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        event.listen(engine, "commit", self._commit)

    def _before(self, conn, cursor, statement, params, context, many) -> None:  # noqa: ANN001
        self._start[id(cursor)] = time.perf_counter()

    def _after(self, conn, cursor, statement, params, context, many) -> None:  # noqa: ANN001
        took = time.perf_counter() - self._start.pop(id(cursor), time.perf_counter())
        self.count[self.phase] = self.count.get(self.phase, 0) + 1
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + took

    def _commit(self, conn) -> None:  # noqa: ANN001
        self.count[self.phase] = self.count.get(self.phase, 0) + 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--study-file", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--artifacts", required=True)
    p.add_argument("--warm", type=int, default=0,
                   help="instead: N interleaved bare-fit / tuner-trial pairs in this process")
    args = p.parse_args()
    if args.warm:
        _warm(args)
        return
    stamps = {"main": T_MAIN}

    import optuna
    from optuna.trial import TrialState

    from tuner import study as studies
    from tuner.budget import Claimer
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.worker import SqlRecorder, artifact_store
    stamps["imports"] = time.time()

    from tuner.tfsetup import init_tensorflow

    init_tensorflow()
    from tuner.data import load_arrays, make_datasets
    from tuner.trial import run_trial
    stamps["tensorflow"] = time.time()

    sql = _SqlClock()
    spec = load_spec(args.study_file)
    storage = open_storage(args.storage)
    sql.attach(storage.engine)
    sql.phase = "storage"
    study, _ = studies.create_or_resume(spec, storage, args.artifacts)
    study, spec = studies.load(spec.name, storage)
    stamps["storage"] = time.time()

    sql.phase = "data"
    arrays = load_arrays(spec.data, seed=spec.seed or 0)
    datasets = make_datasets(arrays, spec.model.batch_size, seed=spec.seed or 0)
    store = artifact_store(study, args.artifacts)
    stamps["data"] = time.time()

    sql.phase = "claim"
    claimer = Claimer(study, storage)
    claimed = claimer.claim()
    trial = claimed.trial
    stamps["claim"] = time.time()

    # The last per-epoch report marks the end of fit; what follows is recording + artifact.
    epoch_ends: list[float] = []
    at_last_report: dict[str, float] = {}
    # As the worker runs it (the probe's study never prunes): attributes in one transaction.
    recorder = SqlRecorder(trial, storage, claimed.trial_id)
    record_epoch = recorder.epoch

    def timed_epoch(step: int, value: float, curve: dict) -> None:
        record_epoch(step, value, curve)
        epoch_ends.append(time.time())
        at_last_report.update(count=sql.count.get("fit", 0), seconds=sql.seconds.get("fit", 0))

    recorder.epoch = timed_epoch  # type: ignore[method-assign]
    sql.phase = "fit"
    result = run_trial(trial, spec, arrays, datasets, store, prune_from=None,
                       recorder=recorder)
    stamps["fit"] = epoch_ends[-1]
    stamps["after_fit"] = time.time()
    sql.count["after_fit"] = sql.count.pop("fit") - int(at_last_report["count"])
    sql.seconds["after_fit"] = sql.seconds.pop("fit") - at_last_report["seconds"]
    sql.count["fit"] = int(at_last_report["count"])
    sql.seconds["fit"] = at_last_report["seconds"]
    sql.phase = "tell"
    claimer.tell(trial, result.val_loss)  # as the worker tells it
    stamps["tell"] = time.time()
    sql.phase = "check"  # the probe's own check, not counted (it was until 2026-12-02: 8)
    assert study.trials[-1].state == TrialState.COMPLETE
    sql.count.pop("check", None)
    sql.seconds.pop("check", None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print("BENCH_JSON " + json.dumps({
        "stamps": stamps, "sql_count": sql.count, "sql_seconds": sql.seconds,
        "epochs_run": result.epochs_run, "val_loss": result.val_loss}), flush=True)


def _warm(args) -> None:  # noqa: ANN001
    """Per-trial cost in a warm worker: imports, storage and data are paid once per process.

    ``tuner.worker.work`` runs the study, exactly as a worker does (claim under the budget lock,
    per-epoch reports, heartbeat, best-K retention, the tell, the figures' throttle, the
    periodic garbage collection); after each of its trials, its ``progress`` hook fits the
    identical network bare (``build_model`` + ``model.fit``, no tuner). A tuner trial's time is
    the time between two hooks, less the bare fit run in the first. The first trial, which
    includes the worker's set-up, is not counted. Wall and CPU seconds (all threads) both.
    The bare fits run with Python's collector settings, as a plain script does, and collect
    their garbage as often as the worker does (every ``GC_EVERY``); every collection's
    seconds are added up for the side it interrupted.
    With a test part in the study, the bare fit's model is scored on it too, as each completed
    trial is. Prints both lists.
    """
    import gc

    import keras

    from tuner import study as studies
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.tfsetup import init_tensorflow
    from tuner.worker import GC_EVERY, work

    init_tensorflow()
    from tuner.data import load_arrays, make_datasets
    from tuner.space import sample
    from tuner.trial import build_model, with_shape

    spec = load_spec(args.study_file)
    storage = open_storage(args.storage)
    studies.create_or_resume(spec, storage, args.artifacts)
    study, spec = studies.load(spec.name, storage)
    arrays = load_arrays(spec.data, seed=spec.seed or 0)
    datasets = make_datasets(arrays, spec.model.batch_size, seed=spec.seed or 0)
    hp = with_shape(sample(optuna_fixed(), spec), arrays)
    plain_test = None
    if arrays.has_test:  # the bare script scores its model too, on a pipeline like its val
        import tensorflow as tf

        from tuner.data import inference_batch_size

        plain_test = tf.data.Dataset.from_tensor_slices((arrays.x_test, arrays.y_test)).cache()
        plain_test = plain_test.batch(
            inference_batch_size(spec.model.batch_size, arrays.input_shape)).prefetch(2)

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    side = "setup"  # whose clock runs: a collection is charged to the side it interrupts
    collecting: dict[str, float] = {"tuner": 0.0, "bare": 0.0, "setup": 0.0}
    started_at = [0.0]

    def on_collection(phase: str, info: dict) -> None:  # gc.callbacks: every collection
        if phase == "start":
            started_at[0] = time.perf_counter()
        else:
            collecting[side] += time.perf_counter() - started_at[0]

    gc.callbacks.append(on_collection)
    fits = 0
    plain_threshold = gc.get_threshold()  # Python's, which a plain script runs with

    def bare() -> tuple[float, float]:
        nonlocal side, fits
        side = "bare"
        worker_threshold = gc.get_threshold()  # the worker collects young objects less often
        gc.set_threshold(*plain_threshold)
        wall, cpu = clocks()
        fits += 1
        if fits % GC_EVERY == GC_EVERY // 2:
            # The worker collects every GC_EVERY trials (its models hold reference cycles),
            # which frees the bare fits' models too. The bare loop collects its own garbage
            # as often, on its own clock, half-way between the worker's collections;
            # without it, every bare fit's garbage was collected on tuner's clock.
            gc.collect()
        keras.utils.set_random_seed(spec.seed or 0)
        model = build_model(hp, spec, seed=spec.seed, scale=arrays.scale)
        model.fit(datasets[0], validation_data=datasets[1], epochs=spec.model.epochs,
                  verbose=0)
        if plain_test is not None:
            model.evaluate(plain_test, verbose=0)
        del model
        keras.backend.clear_session(free_memory=False)  # as tuner does between trials
        end = clocks()
        gc.set_threshold(*worker_threshold)
        side = "tuner"
        return end[0] - wall, end[1] - cpu

    bare()  # warm-up: first-call imports and one-time TensorFlow set-up
    out: dict[str, list[float]] = {"bare": [], "tuner": [], "bare_cpu": [], "tuner_cpu": []}
    since, hooks = clocks(), 0

    def after_trial(outcome) -> None:  # noqa: ANN001
        nonlocal since, hooks
        took = [a - b for a, b in zip(clocks(), since, strict=True)]
        if outcome.state != "COMPLETE":
            raise RuntimeError(f"the overhead study's trial ended {outcome.state}")
        b = bare()
        hooks += 1
        if hooks > 1:  # the first trial holds the worker's set-up
            for key, value in (("tuner", took[0]), ("tuner_cpu", took[1]), ("bare", b[0]),
                               ("bare_cpu", b[1])):
                out[key].append(value)
        else:  # what the set-up and the first trial collected is not counted either
            collecting["tuner"] = collecting["bare"] = 0.0
        since = clocks()

    side = "tuner"
    work(storage, study, spec, n_trials=args.warm + 1, artifacts=args.artifacts,
         progress=after_trial)
    gc.callbacks.remove(on_collection)
    print("BENCH_JSON " + json.dumps({**out, "gc_seconds": {
        "tuner": collecting["tuner"], "bare": collecting["bare"]}}), flush=True)


def optuna_fixed():  # noqa: ANN201
    """Stands in for a trial when every knob is fixed (nothing is suggested)."""
    class _Fixed:
        def suggest_float(self, name: str, low: float, high: float, *, log: bool = False):
            raise AssertionError(f"{name} is not fixed in the overhead study")

    return _Fixed()


if __name__ == "__main__":
    main()
