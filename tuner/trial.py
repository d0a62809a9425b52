"""One trial: build the model, fit it, report every epoch, prune, early-stop, record, save.

The value reported to the pruner, watched by EarlyStopping and returned as the objective is the
validation cross-entropy *without* the L2 penalty (the compiled metric ``xent``). Keras' own
``val_loss`` adds ``l2 · Σw²`` and so would bias the search against L2, the knob being tuned;
it is kept only as the attribute ``keras_val_loss``.

The training loss is measured the way validation is: in inference mode (no dropout, no
augmentation), without the penalty, on a fixed training sample as large as the validation set
(up to :data:`tuner.data.TRAIN_SAMPLE_MAX` images), at every epoch. Keras' own training loss
is a running mean under dropout and augmentation, so a strongly regularized model would show
a large training loss and a small or even negative gap; it is kept as
``train_loss_training_mode``. The sample rides along in Keras' own validation pass, with
weight 0: the weighted metrics (``val_xent``, ``val_accuracy``) see only
the validation images, an unweighted one (``val_xent_pooled``) sees both, and the sample's loss
follows from the two. A pass of its own would trace a predict function for every model.
A completed trial's best-epoch model is scored once on the test split, if the data has one;
the test never takes part in selection.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import keras
import optuna

from tuner import attrs, optuna_sql
from tuner.augment import build_augmentation
from tuner.budget import remember_attrs
from tuner.dashboard import RANDOM_STATE
from tuner.data import Arrays, Datasets
from tuner.models import resolve_family
from tuner.space import Hyperparams, sample
from tuner.spec import StudySpec

MONITOR = "val_xent"
POOLED = "xent_pooled"  # unweighted: validation images and the training sample together
TRAIN_LOSS = "train_xent_inference"  # the reporter adds it to each epoch's logs
MODEL_ARTIFACT = "model.keras"
MODEL_MIMETYPE = "application/octet-stream"


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial is failed with this reason."""


@dataclass(frozen=True)
class TrialResult:
    """What a finished (complete or pruned) trial measured at its best epoch."""

    val_loss: float
    val_accuracy: float
    train_loss: float  # inference mode, no penalty: measured as val_loss is
    train_loss_training_mode: float  # Keras' running mean under dropout and augmentation
    keras_val_loss: float
    best_epoch: int
    epochs_run: int
    pruned_at: int | None
    seconds: float

    @property
    def gap(self) -> float:
        """Generalization gap: validation loss minus training loss at the best epoch."""
        return self.val_loss - self.train_loss

    def attrs(self) -> dict[str, float | int | None]:
        return {attrs.VAL_ACCURACY: self.val_accuracy, attrs.TRAIN_LOSS: self.train_loss,
                attrs.TRAIN_LOSS_TRAINING_MODE: self.train_loss_training_mode,
                attrs.GAP: self.gap, attrs.KERAS_VAL_LOSS: self.keras_val_loss,
                attrs.BEST_EPOCH: self.best_epoch, attrs.EPOCHS_RUN: self.epochs_run,
                attrs.PRUNED_AT: self.pruned_at, attrs.SECONDS: round(self.seconds, 3)}


def build_model(hp: Hyperparams, spec: StudySpec, seed: int | None = None,
                scale: float = 1.0) -> keras.Model:
    """Rescaling to [0, 1] (by ``scale``, see :attr:`tuner.data.Arrays.scale`) and the
    augmentation layers in front of the family's network, compiled for the search."""
    return _build(hp, spec, seed, scale, pooled=False)


def _build(hp: Hyperparams, spec: StudySpec, seed: int | None, scale: float,
           pooled: bool) -> keras.Model:
    body = resolve_family(spec.model.family)(hp)
    if not isinstance(body, keras.layers.Layer):  # else "'int' object is not callable"
        raise TypeError(f"[model] family {spec.model.family}: returned {body!r:.60} "
                        f"({type(body).__name__}), not a keras.Model")
    inputs = keras.Input(hp.input_shape, name="image")
    x = inputs
    if scale != 1.0:
        x = keras.layers.Rescaling(scale, name="rescale")(x)
    augmentation = build_augmentation(hp.augmentation, seed=seed)
    if augmentation is not None:
        x = augmentation(x)
    model = keras.Model(inputs, body(x), name=f"tuner_{body.name}")
    # Weighted metrics: without sample weights (training, a user's evaluate) they are the
    # plain ones; with the weights of ``val_and_train_sample`` they see validation only.
    model.compile(
        optimizer=keras.optimizers.Adam(hp.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        weighted_metrics=[keras.metrics.SparseCategoricalCrossentropy(name="xent"),
                          keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        metrics=[keras.metrics.SparseCategoricalCrossentropy(name=POOLED)] if pooled else None,
    )
    return model


def with_shape(hp: Hyperparams, arrays: Arrays) -> Hyperparams:
    return replace(hp, input_shape=arrays.input_shape, num_classes=arrays.num_classes)


class Recorder(Protocol):
    """How a trial's figures reach the study (see :class:`OptunaRecorder`)."""

    def attrs(self, values: dict[str, Any], system: dict[str, Any] | None = None) -> None:
        """Write several trial user attributes (and system attributes: ``system``)."""

    def epoch(self, step: int, value: float, curve: dict[str, list[float]]) -> None:
        """Report one epoch's objective value and the learning curves so far."""


class OptunaRecorder:
    """Through Optuna's trial API, one call per value: works on every storage."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def attrs(self, values: dict[str, Any], system: dict[str, Any] | None = None) -> None:
        for key, value in (system or {}).items():
            self.trial.storage.set_trial_system_attr(self.trial._trial_id, key, value)
        remember_attrs(self.trial, {}, system)  # the user attributes: set_user_attr does it
        for key, value in values.items():
            self.trial.set_user_attr(key, value)

    def epoch(self, step: int, value: float, curve: dict[str, list[float]]) -> None:
        self.trial.set_user_attr(attrs.CURVE, curve)
        self.trial.report(value, step)


class _EpochReporter(keras.callbacks.Callback):
    """Reports val xent to Optuna each epoch, stops on NaN, and stops when the pruner says so.

    It also keeps the trial's learning curves in the attribute ``curve``, updated every epoch
    (pruned and running trials have theirs too): ``t`` is seconds since the trial started at
    each epoch's end, ``train_loss`` and ``val_loss`` the cross-entropies. The pruner is asked
    from epoch ``prune_from`` on (``None``: never); before that it could only say no, and each
    question costs a read of the trial. Never at the last epoch: stopping the trial there
    saves nothing, and would throw its finished result away (KerasTuner's Hyperband and Ray
    Tune's ASHA likewise complete a trial that reaches the full budget).
    """

    def __init__(self, trial: optuna.Trial, recorder: Recorder, started: float,
                 sizes: tuple[int, int], prune_from: int | None) -> None:
        super().__init__()
        self.trial, self.recorder = trial, recorder
        self.started = started
        self.n_val, self.n_sample = sizes  # validation images, training sample images
        self.prune_from = prune_from
        self.history: list[dict[str, float]] = []
        self.curve: dict[str, list[float]] = {"t": [], "train_loss": [], "val_loss": []}
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        self.history.append(logs)
        value = logs.get(MONITOR, float("nan"))
        for key in ("loss", MONITOR):
            if not math.isfinite(logs.get(key, float("nan"))):
                raise TrialDiverged(f"{key.replace('xent', 'loss')} became "
                                    f"{logs.get(key)} at epoch {epoch + 1}")
        logs[TRAIN_LOSS] = _sample_loss(logs["val_" + POOLED], float(value), self.n_val,
                                       self.n_sample)
        self.curve["t"].append(round(time.perf_counter() - self.started, 2))
        self.curve["train_loss"].append(_curve_point(logs[TRAIN_LOSS]))
        self.curve["val_loss"].append(_curve_point(float(value)))
        self.recorder.epoch(epoch + 1, float(value), self.curve)
        last = epoch + 1 >= (self.params or {}).get("epochs", math.inf)
        if self.prune_from is not None and epoch + 1 >= self.prune_from and not last \
                and self.trial.should_prune():
            self.pruned_at = epoch + 1
            self.model.stop_training = True


def _curve_point(loss: float) -> float:
    """5 decimals, or 5 significant digits below 0.001: a loss near 0 must not read as a
    plateau at 0 (the curve is rewritten every epoch, so it is kept short)."""
    return round(loss, 5) if abs(loss) >= 1e-3 else float(f"{loss:.5g}")


class _StopPoints(keras.callbacks.Callback):
    """Calls ``check`` before every training and validation batch.

    A trial is stopped (a signal, its time limit) only here, where an exception leaves
    Keras the ordinary way. Raised from a signal handler it could land anywhere: inside
    TensorFlow's C++ calls back into Python it became a ``SystemError`` and the process hung
    instead of giving its trial back. A batch is the longest wait it adds. Batch *begin*
    hooks: where Keras hands batch-end callbacks to a thread (JAX, PyTorch), a batch-end
    hook would make it read every batch's logs back from the device before the next step.
    """

    def __init__(self, check: Callable[[], None]) -> None:
        super().__init__()
        self.check = check

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.check()

    def on_test_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.check()


class _BestWeights(keras.callbacks.Callback):
    """Keeps the best epoch's weights (by ``MONITOR``) and puts them back when fit ends.

    Keras' ``EarlyStopping(restore_best_weights=True)`` copies every weight to host memory at
    each improvement, across the bus on a GPU; here the copies stay on the model's device.
    Every trial of a study has the same weight shapes, so the copies are made once per process
    and shape (:func:`_copies_for`) and written by one traced function (:func:`_copy_all`):
    one call an improvement instead of an eager assign per weight, and no variables created
    per trial.
    """

    def __init__(self) -> None:
        super().__init__()
        self.best = math.inf
        self.copies: list[Any] | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(MONITOR, math.nan)
        if not value < self.best:  # NaN never improves
            return
        self.best = value
        weights = [w.value for w in self.model.weights]
        if self.copies is None:
            self.copies = _copies_for(weights)
        _copy_all()(self.copies, weights)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.copies is not None:
            _copy_all()([w.value for w in self.model.weights], self.copies)
            self.copies = None


_COPIES: dict[tuple, list[Any]] = {}  # weight shapes and dtypes -> variables to copy into


def _copies_for(weights: list[Any]) -> list[Any]:
    """Variables to hold a copy of ``weights``, made on the first call for these shapes and
    reused by every later model of the same shapes (one trial at a time per process)."""
    import tensorflow as tf

    layout = tuple((tuple(w.shape), w.dtype.name) for w in weights)
    if layout not in _COPIES:
        _COPIES[layout] = [tf.Variable(tf.zeros(w.shape, w.dtype), trainable=False)
                           for w in weights]
    return _COPIES[layout]


@functools.cache
def _copy_all() -> Callable[[list[Any], list[Any]], None]:
    """``copy(targets, sources)`` assigns every source to its target in one traced call,
    traced once per shape layout (TensorFlow keys a trace on variables' shapes, not on which
    variables they are)."""
    import tensorflow as tf

    @tf.function(autograph=False)
    def copy(targets: list[Any], sources: list[Any]) -> None:
        for target, source in zip(targets, sources, strict=True):
            target.assign(source)

    return copy


def _sample_loss(pooled: float, val: float, n_val: int, n_sample: int) -> float:
    """The training sample's mean loss, from the mean over validation and sample together
    (``pooled``) and the validation mean (``val``)."""
    return (float(pooled) * (n_val + n_sample) - val * n_val) / n_sample


def run_trial(trial: optuna.Trial, spec: StudySpec, arrays: Arrays, datasets: Datasets,
              artifact_store: optuna.artifacts.FileSystemArtifactStore | None = None, *,
              prune_from: int | None = 1, recorder: Recorder | None = None,
              keep_model: Callable[[float], bool] | None = None,
              stop_check: Callable[[], None] | None = None) -> TrialResult:
    """Train one sampled configuration; raises :class:`optuna.TrialPruned` when pruned.

    The trial's attributes are written before returning or raising, so pruned trials carry
    them too. A completed trial's best-epoch model is scored on the test split (attributes
    ``test_loss``, ``test_accuracy``) and, if ``keep_model(val_loss)`` says so (by default
    always), uploaded to ``artifact_store``. ``prune_from``: the first epoch at which the
    pruner is asked (``None``: never, as for the runs of a confirm step). ``recorder``: how
    figures are written (default :class:`OptunaRecorder`). ``stop_check`` is called before
    every batch; what it raises (a stop signal, a time limit) ends the trial there.
    """
    started = time.perf_counter()
    recorder = recorder or OptunaRecorder(trial)
    recorder.attrs({attrs.STARTED_AT: round(time.time(), 3), attrs.HOST: socket.gethostname(),
                    attrs.GPU: os.environ.get("CUDA_VISIBLE_DEVICES", "") or "cpu",
                    attrs.PID: os.getpid()})
    hp = with_shape(sample(trial, spec), arrays)
    seed = None if spec.seed is None else spec.seed + trial.number
    with RANDOM_STATE:  # no figure drawn on another thread draws from it meanwhile
        if seed is not None:
            keras.utils.set_random_seed(seed)
        model = _build(hp, spec, seed, arrays.scale, pooled=True)
    validation = datasets.val_and_train_sample
    reporter = _EpochReporter(trial, recorder, started,
                              (len(arrays.y_val), len(datasets.train_sample[1])), prune_from)
    stopper = keras.callbacks.EarlyStopping(monitor=MONITOR, mode="min",
                                            patience=spec.model.patience)
    callbacks = [reporter, stopper, _BestWeights()]
    if stop_check is not None:
        callbacks.insert(0, _StopPoints(stop_check))
    try:
        model.fit(datasets.train, validation_data=validation, epochs=spec.model.epochs,
                  verbose=0,
                  shuffle=False,  # the tf.data pipeline shuffles
                  callbacks=callbacks)
        history = reporter.history
        best = min(range(len(history)), key=lambda i: history[i][MONITOR])
        result = TrialResult(
            val_loss=float(history[best][MONITOR]),
            val_accuracy=float(history[best]["val_accuracy"]),
            train_loss=history[best][TRAIN_LOSS],
            train_loss_training_mode=float(history[best]["xent"]),
            # Keras' val_loss is the data loss plus l2·Σw² (restored: the best epoch's
            # weights); its own figure averaged the weight-0 sample in
            keras_val_loss=float(history[best][MONITOR]) + _penalty(model),
            best_epoch=best + 1,
            epochs_run=len(history),
            pruned_at=reporter.pruned_at,
            seconds=time.perf_counter() - started,
        )
        figures = result.attrs()
        if result.pruned_at is None and datasets.test is not None:
            # the best epoch's weights, restored by _BestWeights
            test = model.evaluate(datasets.test, verbose=0, return_dict=True)
            figures.update({attrs.TEST_LOSS: float(test["xent"]),
                            attrs.TEST_ACCURACY: float(test["accuracy"])})
        system: dict[str, Any] = {}
        artifact_id = None
        if result.pruned_at is None and artifact_store is not None \
                and (keep_model is None or keep_model(result.val_loss)):
            artifact_id = figures[attrs.MODEL_ARTIFACT] = str(uuid.uuid4())
            key, record = optuna_sql.artifact_record(artifact_id, MODEL_ARTIFACT, MODEL_MIMETYPE)
            system[key] = record
        # The model's record in the same write, and before its file: a process stopped in
        # between leaves a record on a failed trial, which retention clears, never a file
        # that no record names.
        recorder.attrs(figures, system)
        if artifact_id is not None:
            save_model(model, artifact_store, artifact_id)
        if result.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at epoch {result.pruned_at}")
        return result
    finally:
        del model
        # No gc.collect here (0.5 s a trial): the worker collects every few trials.
        keras.backend.clear_session(free_memory=False)


def _penalty(model: keras.Model) -> float:
    """The regularization losses (``l2 · Σw²``) Keras adds to its loss."""
    return float(sum(float(keras.ops.convert_to_numpy(x)) for x in model.losses))


def save_model(model: keras.Model, artifact_store: optuna.artifacts.FileSystemArtifactStore,
               artifact_id: str | None = None) -> str:
    """Write the (best-epoch) model to the store as ``model.keras``; its artifact id.

    Only the file: the caller records it (:func:`tuner.optuna_sql.artifact_record`) with the
    trial's other attributes, in one transaction, where ``upload_artifact`` and
    ``set_user_attr`` would take two or three more.
    """
    artifact_id = artifact_id or str(uuid.uuid4())
    with tempfile.TemporaryDirectory(prefix="tuner-") as tmp:
        path = Path(tmp) / MODEL_ARTIFACT
        _save_keras(model, path)
        with path.open("rb") as f:
            artifact_store.write(artifact_id, f)
    return artifact_id


_SKIPSETS: dict[str, Any] = {}  # attribute names Keras' saving skips, per kind of object


def _save_keras(model: keras.Model, path: Path) -> None:
    """``model.save(path)``, without finding again what an earlier save found.

    For each kind of object (layer, optimizer, metric...) Keras' saving builds a throwaway
    one to learn which attribute names to skip, 40 % of a small model's save. It means to
    keep them in its global state, but stores them under another key than it looks up
    (``saving_attr_skipset_`` against ``saving_attr_skiplist_``, Keras 3.15), and
    ``clear_session`` between trials would wipe them anyway. They depend only on the Keras
    version, so they are kept here and handed back under both keys before each save.
    """
    from keras.src.backend.common import global_state

    for kind, names in _SKIPSETS.items():
        for prefix in ("saving_attr_skiplist_", "saving_attr_skipset_"):
            global_state.set_global_attribute(prefix + kind, names)
    model.save(path)
    for key, names in vars(global_state.GLOBAL_STATE_TRACKER).items():
        if key.startswith("saving_attr_skipset_") and names is not None:
            _SKIPSETS[key.removeprefix("saving_attr_skipset_")] = names
