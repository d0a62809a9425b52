"""One trial in-process: the objective excludes the L2 penalty, augmentation is in the model,
pruning and early stopping record what a user reads back, NaN fails the trial with a reason."""

from __future__ import annotations

import os
import signal

import keras
import numpy as np
import optuna
import pytest

from tuner.augment import build_augmentation
from tuner.data import load_arrays, make_datasets
from tuner.space import Augmentation, Hyperparams, from_params, param_names, sample
from tuner.spec import parse_spec
from tuner.trial import MONITOR, TrialDiverged, _BestWeights, build_model, run_trial, with_shape


def spec_for(search: dict, **model) -> object:
    return parse_spec({"study": {"name": "t", "seed": 0},
                       "data": {"source": "digits", "limit": 300},
                       "model": {"epochs": 2, "batch_size": 64, **model},
                       "search": search})


@pytest.fixture(scope="module")
def arrays():
    return load_arrays(spec_for({}).data)


def hp_for(arrays, l2: float, dropout: float = 0.0, strength: float = 0.0) -> Hyperparams:
    hp = Hyperparams(dropout=(dropout,), l2=l2, augmentation=Augmentation.from_strength(strength),
                     learning_rate=1e-3)
    return with_shape(hp, arrays)


def test_objective_is_the_unpenalized_validation_loss(arrays) -> None:
    """Two models identical but for L2 have the same data loss; Keras' val_loss differs."""
    spec = spec_for({})
    val = make_datasets(arrays, 64).val
    scores = {}
    for l2 in (0.0, 0.1):
        keras.utils.set_random_seed(7)
        model = build_model(hp_for(arrays, l2), spec, scale=arrays.scale)
        scores[l2] = model.evaluate(val, verbose=0, return_dict=True)
        penalty = float(sum(keras.ops.convert_to_numpy(x) for x in model.losses)) if l2 else 0.0
        assert scores[l2]["loss"] == pytest.approx(scores[l2]["xent"] + penalty, rel=1e-4)
    assert scores[0.0]["xent"] == pytest.approx(scores[0.1]["xent"], rel=1e-5)
    assert scores[0.1]["loss"] > scores[0.1]["xent"] + 0.5  # Keras' val_loss carries l2·Σw²


def test_trial_reports_unpenalized_loss_every_epoch(arrays) -> None:
    spec = spec_for({"dropout": 0.1, "l2": 0.05, "augment": 0.2})
    study = optuna.create_study()
    trial = study.ask()
    result = run_trial(trial, spec, arrays, make_datasets(arrays, 64))
    study.tell(trial, result.val_loss)
    frozen = study.trials[0]
    assert sorted(frozen.intermediate_values) == [1, 2]
    assert result.val_loss == min(frozen.intermediate_values.values())
    assert result.keras_val_loss > result.val_loss  # penalty excluded from the objective
    assert result.gap == pytest.approx(result.val_loss - result.train_loss)
    attrs = frozen.user_attrs
    for key in ("val_accuracy", "train_loss", "gap", "best_epoch", "epochs_run", "host",
                "seconds", "keras_val_loss"):
        assert key in attrs
    assert attrs["epochs_run"] == 2 and 1 <= attrs["best_epoch"] <= 2


def test_the_gap_is_measured_without_dropout_or_augmentation(arrays, tmp_path) -> None:
    """Heavy dropout and augmentation make Keras' training loss large; the training loss tuner
    reports is the best-epoch model's, in inference mode, on a fixed training sample."""
    spec = spec_for({"dropout": 0.6, "l2": 1e-4, "augment": 1.0}, epochs=3)
    datasets = make_datasets(arrays, 64, seed=0)
    study = optuna.create_study()
    trial = study.ask()
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    result = run_trial(trial, spec, arrays, datasets, store)
    study.tell(trial, result.val_loss)
    attrs = study.trials[0].user_attrs
    path = tmp_path / "model.keras"
    optuna.artifacts.download_artifact(artifact_store=store, file_path=str(path),
                                       artifact_id=attrs["model_artifact"])
    model = keras.saving.load_model(path)
    x, y = datasets.train_sample
    measured = model.evaluate(x, y, verbose=0, return_dict=True)["xent"]
    assert attrs["train_loss"] == pytest.approx(measured, rel=1e-4)
    assert attrs["train_loss_training_mode"] > attrs["train_loss"]  # dropout made it worse
    assert attrs["gap"] == pytest.approx(result.val_loss - attrs["train_loss"])
    curve = attrs["curve"]
    assert len(curve["train_loss"]) == len(curve["val_loss"]) == len(curve["t"]) == 3
    assert curve["train_loss"][attrs["best_epoch"] - 1] == pytest.approx(attrs["train_loss"],
                                                                         abs=1e-5)


def test_the_model_ends_with_the_weights_of_its_best_epoch_not_its_last(arrays) -> None:
    """Epochs 1 and 3 beat the epochs after them: fit ends on epoch 3's weights, whatever
    the later, worse epochs (and a NaN one) left."""
    model = build_model(hp_for(arrays, l2=0.0), spec_for({}))
    keeper = _BestWeights()
    keeper.set_model(model)
    seen = []
    for epoch, value in enumerate([0.9, 0.95, 0.5, 0.7, float("nan")]):
        for weight in model.weights:
            weight.assign(np.random.default_rng(epoch).normal(size=weight.shape))
        seen.append([w.numpy().copy() for w in model.weights])
        keeper.on_epoch_end(epoch, {MONITOR: value})
    keeper.on_train_end()
    for restored, best in zip(model.weights, seen[2], strict=True):
        np.testing.assert_array_equal(restored.numpy(), best)


def test_models_trained_one_after_another_each_end_with_their_own_best_weights(arrays) -> None:
    """The copies are shared by every model of the same shapes in a process: the second
    model's epochs must not reach the first's restored weights, and a model that never
    improved (pruned, or NaN from the start) is not given the previous model's best."""
    def train(model, values: list[float], seed: int) -> list[list[np.ndarray]]:
        keeper, seen = _BestWeights(), []
        keeper.set_model(model)
        for epoch, value in enumerate(values):
            for weight in model.weights:
                weight.assign(np.random.default_rng([seed, epoch]).normal(size=weight.shape))
            seen.append([w.numpy().copy() for w in model.weights])
            keeper.on_epoch_end(epoch, {MONITOR: value})
        keeper.on_train_end()
        return seen

    first, second, third = (build_model(hp_for(arrays, l2=0.0), spec_for({}))
                            for _ in range(3))
    seen_first = train(first, [0.5, 0.9], seed=1)
    seen_second = train(second, [0.9, 0.4, 0.8], seed=2)
    seen_third = train(third, [float("nan")], seed=3)
    for model, best in ((first, seen_first[0]), (second, seen_second[1]),
                        (third, seen_third[0])):
        for restored, expected in zip(model.weights, best, strict=True):
            np.testing.assert_array_equal(restored.numpy(), expected)


def test_a_completed_trial_is_scored_once_on_the_test_split(tmp_path) -> None:
    """The figures are those of the model the trial keeps (its best epoch) on the test part."""
    spec = parse_spec({"study": {"name": "t", "seed": 0},
                       "data": {"source": "digits", "limit": 300, "test_split": 0.2},
                       "model": {"epochs": 3, "batch_size": 64},
                       "search": {"dropout": 0.1, "l2": 1e-4, "augment": 0}})
    arrays = load_arrays(spec.data)
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    study = optuna.create_study()
    trial = study.ask()
    result = run_trial(trial, spec, arrays, make_datasets(arrays, 64), store)
    study.tell(trial, result.val_loss)
    attrs = study.trials[0].user_attrs
    assert attrs["test_loss"] != pytest.approx(result.val_loss)  # another split
    saved = tmp_path / "model.keras"
    saved.write_bytes((tmp_path / attrs["model_artifact"]).read_bytes())
    model = keras.models.load_model(saved)
    scores = model.evaluate(arrays.x_test, arrays.y_test, verbose=0, return_dict=True)
    assert attrs["test_loss"] == pytest.approx(scores["xent"], rel=1e-4)
    assert attrs["test_accuracy"] == pytest.approx(scores["accuracy"])


def test_pruned_trial_stops_early_and_keeps_its_attributes(arrays) -> None:
    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return True

    spec = spec_for({"dropout": 0.1, "l2": 1e-4, "augment": 0}, epochs=5)
    study = optuna.create_study(pruner=AlwaysPrune())
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        run_trial(trial, spec, arrays, make_datasets(arrays, 64))
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    attrs = study.trials[0].user_attrs
    assert attrs["pruned_at"] == 1 and attrs["epochs_run"] == 1
    # its learning curves too, up to the epoch it was stopped at (the dashboard draws them)
    curve = attrs["curve"]
    assert len(curve["train_loss"]) == len(curve["val_loss"]) == len(curve["t"]) == 1
    assert curve["val_loss"][0] == pytest.approx(study.trials[0].intermediate_values[1],
                                                 abs=1e-5)


def test_nan_loss_fails_with_a_reason(arrays) -> None:
    spec = spec_for({"dropout": 0.0, "l2": 0, "augment": 0}, family="user_models:diverges")
    study = optuna.create_study()
    with pytest.raises(TrialDiverged, match="loss became nan at epoch 1"):
        run_trial(study.ask(), spec, arrays, make_datasets(arrays, 64))


def test_a_stop_signal_ends_the_trial_between_two_batches(arrays) -> None:
    """A worker's SIGTERM during training is only noted by the handler, which raises nothing
    (it could land inside TensorFlow's C++ code); the next batch's stop check raises it, and
    the epochs reported before it are kept."""
    from tuner.worker import Interrupted, _interrupts_raise, _stop_check, _TimeLimit

    spec = spec_for({"dropout": 0.1, "l2": 1e-4, "augment": 0}, epochs=50)
    study = optuna.create_study()
    trial = study.ask()
    calls: list[str] = []
    with _interrupts_raise() as signals:
        check = _stop_check(signals, _TimeLimit(None))

        def stop_check() -> None:
            calls.append("batch")
            if len(calls) == 12:
                os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here
                calls.append("after the signal")
            check()

        with pytest.raises(Interrupted, match="SIGTERM"):
            run_trial(trial, spec, arrays, make_datasets(arrays, 64), stop_check=stop_check)
    assert calls[-1] == "after the signal"  # raised by the check, not inside the handler
    assert 1 <= len(trial.storage.get_trial(trial._trial_id).intermediate_values) < 50


def test_a_trial_past_its_time_limit_stops_before_its_first_batch(arrays) -> None:
    from tuner.worker import TrialTimedOut, _TimeLimit

    spec = spec_for({"dropout": 0.1, "l2": 1e-4, "augment": 0}, epochs=50)
    study = optuna.create_study()
    trial = study.ask()
    limit = _TimeLimit(0.0)
    with pytest.raises(TrialTimedOut):
        run_trial(trial, spec, arrays, make_datasets(arrays, 64), stop_check=limit.check)
    assert limit.fired and study.trials[0].intermediate_values == {}


def test_strength_zero_adds_no_layers_and_flip_only_when_allowed() -> None:
    assert build_augmentation(Augmentation.from_strength(0.0, flip=True)) is None
    names = [type(layer).__name__ for layer in
             build_augmentation(Augmentation.from_strength(0.5)).layers]
    assert names == ["RandomRotation", "RandomTranslation", "RandomZoom", "RandomContrast"]
    flipped = build_augmentation(Augmentation.from_strength(0.5, flip=True))
    assert type(flipped.layers[0]).__name__ == "RandomFlip"
    only_zoom = build_augmentation(Augmentation(zoom=0.2))
    assert [type(layer).__name__ for layer in only_zoom.layers] == ["RandomZoom"]


def test_augmentation_is_inside_the_model_and_off_at_inference(arrays) -> None:
    model = build_model(hp_for(arrays, 1e-4, strength=1.0), spec_for({}), scale=arrays.scale)
    assert any(layer.name == "augmentation" for layer in model.layers)
    x = arrays.x_val[:16]
    np.testing.assert_allclose(model(x, training=False), model(x, training=False))
    augmented = model.get_layer("augmentation")(x, training=True)
    assert not np.allclose(keras.ops.convert_to_numpy(augmented), x)


def test_per_layer_dropout_reaches_each_layer(arrays) -> None:
    spec = spec_for({"dropout": [[0.1, 0.1], [0.4, 0.4]], "l2": 1e-4})
    hp = with_shape(from_params({}, spec), arrays)
    model = build_model(hp, spec)
    rates = [layer.rate for layer in model.get_layer("mlp").layers
             if isinstance(layer, keras.layers.Dropout)]
    assert rates == [0.1, 0.4]


def test_sampled_names_and_per_transform_ranges() -> None:
    spec = spec_for({"dropout": [[0, 0.2], [0, 0.3]], "l2": [1e-5, 1e-3],
                     "augment": {"rotation": [0, 0.1], "contrast": [0, 0.4]},
                     "learning_rate": [1e-4, 1e-2]})
    assert param_names(spec) == ["dropout_0", "dropout_1", "l2", "augment_rotation",
                                 "augment_contrast", "learning_rate"]
    trial = optuna.create_study().ask()
    hp = sample(trial, spec)
    assert set(trial.params) == set(param_names(spec))
    assert hp.augmentation.zoom == 0 and 0 <= hp.augmentation.rotation <= 0.1
    assert trial.distributions["l2"].log and trial.distributions["learning_rate"].log


def test_user_model_function_family(arrays, tmp_path) -> None:
    """The trial trains the user's network, built with the sampled dropout and L2."""
    spec = spec_for({"dropout": 0.2, "l2": 1e-4}, family="user_models:tiny")
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    study = optuna.create_study()
    trial = study.ask()
    result = run_trial(trial, spec, arrays, make_datasets(arrays, 64), store)
    assert np.isfinite(result.val_loss)
    saved = tmp_path / "model.keras"
    saved.write_bytes((tmp_path / trial.user_attrs["model_artifact"]).read_bytes())
    layers = _flat(keras.models.load_model(saved).layers)
    dense = [layer for layer in layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [16, 10]  # user_models.tiny, not the MLP
    assert dense[0].kernel_regularizer.get_config()["l2"] == pytest.approx(1e-4)
    assert [layer.rate for layer in layers if isinstance(layer, keras.layers.Dropout)] == [0.2]


def test_a_model_function_that_returns_no_model_says_so(arrays) -> None:
    spec = spec_for({"dropout": 0.2, "l2": 1e-4}, family="user_models:forgot_the_model")
    hp = with_shape(sample(optuna.trial.FixedTrial({}), spec), arrays)
    with pytest.raises(TypeError, match=r"\[model\] family user_models:forgot_the_model: "
                                        r"returned 42 \(int\), not a keras.Model"):
        build_model(hp, spec)


def _flat(layers: list) -> list:
    out = []
    for layer in layers:
        out += _flat(layer.layers) if hasattr(layer, "layers") else [layer]
    return out


def test_the_workers_recorder_writes_what_optuna_and_the_pruner_read(arrays, any_url) -> None:
    """The worker writes an epoch's value and curves in one transaction of its own: Optuna reads
    them back as intermediate values, a pruner decides on them, and a trial that another worker
    failed in the meantime is refused as Optuna refuses it."""
    from tuner.storage import open_storage
    from tuner.worker import SqlRecorder

    class PruneAtTwo(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return sorted(trial.intermediate_values) == [1, 2]

    storage = open_storage(any_url)
    study = optuna.create_study(storage=storage, pruner=PruneAtTwo())
    trial = study.ask()
    spec = spec_for({"dropout": 0.1, "l2": 1e-4, "augment": 0}, epochs=4)
    with pytest.raises(optuna.TrialPruned):
        run_trial(trial, spec, arrays, make_datasets(arrays, 64),
                  recorder=SqlRecorder(trial, storage, trial._trial_id))
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    frozen = study.trials[0]
    curve = frozen.user_attrs["curve"]
    assert sorted(frozen.intermediate_values) == [1, 2] and frozen.user_attrs["pruned_at"] == 2
    assert list(frozen.intermediate_values.values()) == pytest.approx(curve["val_loss"], abs=1e-5)

    other = study.ask()
    recorder = SqlRecorder(other, storage, other._trial_id)
    recorder.epoch(1, 0.5, {"val_loss": [0.5]})
    recorder.flush()
    storage.set_trial_state_values(other._trial_id, state=optuna.trial.TrialState.FAIL)
    recorder.epoch(2, 0.4, {"val_loss": [0.5, 0.4]})  # written behind training: refused there
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        recorder.flush()
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        recorder.epoch(3, 0.3, {"val_loss": [0.5, 0.4, 0.3]})
    recorder.close()
    assert study.trials[1].intermediate_values == {1: 0.5}
    assert study.trials[1].user_attrs["curve"] == {"val_loss": [0.5]}
    storage.engine.dispose()


def test_epochs_written_behind_training_arrive_in_order_and_before_the_last_attributes(
        any_url) -> None:
    """The recorder's thread writes what training reported, every epoch in order, even when
    the epochs come faster than the database takes them; attrs() waits for all of them."""
    from tuner.storage import open_storage
    from tuner.worker import SqlRecorder

    storage = open_storage(any_url)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    recorder = SqlRecorder(trial, storage, trial._trial_id)
    curve: dict[str, list[float]] = {"val_loss": []}
    for step in range(1, 41):
        curve["val_loss"].append(1.0 / step)  # the reporter grows one list in place
        recorder.epoch(step, 1.0 / step, curve)
        assert trial._cached_frozen_trial.intermediate_values[step] == 1.0 / step  # at once
    recorder.attrs({"epochs_run": 40})
    frozen = storage.get_trial(trial._trial_id)
    assert frozen.intermediate_values == {s: pytest.approx(1.0 / s) for s in range(1, 41)}
    assert frozen.user_attrs["curve"]["val_loss"] == pytest.approx(curve["val_loss"])
    assert frozen.user_attrs["epochs_run"] == 40
    recorder.close()
    assert not recorder._thread.is_alive()
    storage.engine.dispose()


def test_epochs_within_the_write_interval_go_in_one_write_and_attrs_do_not_wait_for_it(
        pg_url) -> None:
    """A fast trial's epochs are gathered for the interval (a GPU trains a small model's epoch
    in less time than its write takes), the first one written at once; the trial's last
    attributes flush them without waiting out the interval."""
    import time

    from tuner.storage import open_storage
    from tuner.worker import SqlRecorder

    storage = open_storage(pg_url)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    recorder = SqlRecorder(trial, storage, trial._trial_id, interval=3)

    def written() -> dict[int, float]:
        return storage.get_trial(trial._trial_id).intermediate_values

    recorder.epoch(1, 1.0, {"val_loss": [1.0]})
    deadline = time.monotonic() + 10
    while not written() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert written() == {1: 1.0}
    for step in range(2, 6):
        recorder.epoch(step, 1.0 / step, {"val_loss": [1.0 / s for s in range(1, step + 1)]})
    time.sleep(0.5)
    if time.monotonic() - started < 2.5:  # the machine did not stall past the interval
        assert written() == {1: 1.0}
    while len(written()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(written()) == [1, 2, 3, 4, 5]  # the interval ended: written unasked
    recorder.epoch(6, 0.1, {"val_loss": [0.1] * 6})
    began = time.monotonic()
    recorder.attrs({"epochs_run": 6})
    assert time.monotonic() - began < 2.5  # not the 3 s interval
    assert sorted(written()) == [1, 2, 3, 4, 5, 6]
    assert storage.get_trial(trial._trial_id).user_attrs["curve"]["val_loss"] == [0.1] * 6
    recorder.close()
    storage.engine.dispose()


@pytest.mark.parametrize("recorder", ["worker's (SQL)", "Optuna's"])
def test_a_trial_told_from_its_own_copy_matches_the_database(arrays, tmp_path, pg_url,
                                                              recorder) -> None:
    """The worker tells a trial without reading it back (``Claimer.tell``): what it returns,
    and prints, must be what was stored, attributes and the model's record included."""
    from tuner.budget import Claimer
    from tuner.storage import open_storage
    from tuner.worker import SqlRecorder

    storage = open_storage(pg_url)
    study = optuna.create_study(storage=storage, study_name="told")
    claimed = Claimer(study, storage).claim()
    trial = claimed.trial
    sql = SqlRecorder(trial, storage, claimed.trial_id) if recorder.startswith("worker") \
        else None
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    spec = spec_for({"dropout": 0.1, "l2": 1e-4, "augment": 0.1})
    try:
        result = run_trial(trial, spec, arrays, make_datasets(arrays, 64), store,
                           recorder=sql)
    finally:
        if sql is not None:
            sql.close()
    told = Claimer(study, storage).tell(trial, result.val_loss)
    stored = storage.get_trial(claimed.trial_id)
    assert told.user_attrs == stored.user_attrs and told.user_attrs["epochs_run"] == 2
    assert told.system_attrs == stored.system_attrs
    assert any(key.startswith("artifacts:") for key in told.system_attrs)
    assert (told.state, told.value, told.params, told.intermediate_values) == \
        (stored.state, stored.value, stored.params, stored.intermediate_values)
