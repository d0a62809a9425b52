"""The worker loop: claim a trial within the study's budget, train it, tell the result.

One loop runs per process (one process per GPU, see :mod:`tuner.supervisor`). The data is
loaded once per process and reused by every trial. Which trial a worker gets, and when it
stops or waits, is the claim path's business (:mod:`tuner.budget`); this loop trains what it is
given. A trial interrupted by SIGTERM or Ctrl-C is given back (failed with reason
"interrupted" and queued again) before the worker exits; a signal that arrives while the
worker waits for a free slot stops it at once. A trial that trains longer than the study's
``trial_timeout`` is failed with that reason, and the worker moves on.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from tuner import attrs, optuna_sql
from tuner import study as studies
from tuner.budget import Claimed, Claimer, grace_period, remember_attrs, remember_report
from tuner.dashboard import FigurePublisher
from tuner.errors import RuntimeFailure
from tuner.pruning import warmup_epochs
from tuner.render import duration, no_gpu_seen, waiting
from tuner.retention import Retention
from tuner.settings import STOP_SIGNALS, artifacts_dir, epoch_write_interval
from tuner.spec import StudySpec
from tuner.storage import DatabaseGone, retry_on_disconnect

_log = logging.getLogger("tuner.worker")
MAX_FAILURES_IN_A_ROW = 5
GC_EVERY = 10  # trials between full garbage collections
YOUNG_THRESHOLD = 10_000  # allocations between young collections while a worker runs


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT so the running trial can be given back."""


class TrialTimedOut(BaseException):
    """Raised in the main thread when a trial trains past the study's ``trial_timeout``.

    A BaseException, like :class:`Interrupted`, so that no library turns it into an error of
    its own on the way out of ``model.fit``.
    """


@dataclass(frozen=True)
class Outcome:
    """One trial as the worker saw it end; what the progress line prints."""

    number: int
    state: str
    epochs_run: int | None
    value: float | None
    best_value: float | None
    best_number: int | None
    seconds: float
    reason: str = ""


@dataclass(frozen=True)
class Summary:
    trials_run: int
    stopped_because: str


def work(storage: RDBStorage, study: optuna.Study, spec: StudySpec, *,
         n_trials: int | None = None,
         timeout: float | None = None, artifacts: str | None = None, seed_offset: int = 0,
         progress: Callable[[Outcome], None] | None = None,
         notice: Callable[[str], None] | None = None, hung_exit: int = 1) -> Summary:
    """Run trials of ``study`` (see :func:`tuner.study.load`) until its budget, or this
    worker's cap, is spent.

    ``progress`` hears of every finished trial, ``notice`` of a worker that starts waiting for
    a free slot. ``hung_exit`` is the exit status of this process if a trial hangs past its
    time limit where no exception reaches it (see :class:`_Heartbeat`).
    """
    # A seeded study stays reproducible, but a second `tuner run` must not draw the same
    # configurations again: the seed moves on by the trials the study already holds, and
    # once this worker creates its first trial, by that trial's number, which no other
    # worker shares (two `tuner run` started together would otherwise draw in pairs).
    def seed_apart(number: int) -> None:
        if number != started_with:
            study.sampler = studies.make_sampler(spec, seed_offset + number)

    claimer = Claimer(study, storage, first_created=seed_apart)
    usage = claimer.state()[0]
    started_with = usage.finished + usage.running + usage.waiting + usage.failed
    study.sampler = studies.make_sampler(spec, seed_offset + started_with)
    verdict = claimer.verdict()
    if verdict.reason:  # the budget is spent: say so before paying for TensorFlow
        return Summary(0, verdict.reason)
    from tuner.tfsetup import init_tensorflow

    gpus = init_tensorflow()  # TensorFlow only where trials run
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not gpus and pinned.strip() not in ("", "-1") and notice is not None:
        from importlib.metadata import version  # else a GPU node silently trains on its CPU

        notice(no_gpu_seen(pinned, version("tensorflow")))
    from tuner.data import load_arrays, make_datasets
    from tuner.models import resolve_family

    resolve_family(spec.model.family)  # a user's module that does not import: one line, no trial
    from tuner.trial import TrialDiverged, run_trial

    arrays = load_arrays(spec.data, seed=spec.seed or 0)
    datasets = make_datasets(arrays, spec.model.batch_size, seed=spec.seed or 0)
    store = artifact_store(study, artifacts)
    retention = Retention(claimer, store, spec.keep_models)
    first_prunable = None if spec.pruner == "none" else warmup_epochs(spec) + 1
    figures = FigurePublisher(study, storage)
    started = time.monotonic()
    failures_in_a_row = 0
    ran = 0
    with _interrupts_raise() as signals, _final_figures(figures), _frozen_heap():
        while True:
            signals.check()
            if n_trials is not None and ran >= n_trials:
                return Summary(ran, f"ran --n-trials {n_trials}")
            if timeout is not None and time.monotonic() - started >= timeout:
                return Summary(ran, f"reached --timeout {timeout:g}s")
            waited = False

            def wait(seconds: float) -> None:
                nonlocal waited
                if not waited and notice is not None:
                    notice(waiting())
                waited = True
                if timeout is not None:  # a worker waiting for a slot obeys --timeout too
                    left = timeout - (time.monotonic() - started)
                    if left <= 0:
                        raise _TimedOut
                    seconds = min(seconds, left)
                signals.sleep(seconds)

            try:
                claimed = claimer.claim(wait=wait)
            except _TimedOut:
                return Summary(ran, f"reached --timeout {timeout:g}s")
            if not isinstance(claimed, Claimed):
                retention.clear_failed()  # models of trials whose workers were killed
                return Summary(ran, claimed.reason)
            trial = claimed.trial
            retention.follow(claimed.keep_models)
            confirming = claimed.confirms is not None  # a confirm run: to the end, model kept
            ran += 1
            if ran % GC_EVERY == 0:
                gc.collect()  # Keras' model cycles; once per trial would cost 0.5 s each
            t0 = time.monotonic()
            reason = ""
            limit = _TimeLimit(claimed.timeout)
            recorder = SqlRecorder(trial, storage, claimed.trial_id)
            completed = False  # told COMPLETE: its model stays (retention decides)
            with _Heartbeat(storage, claimed, claimer.sweep, hung_exit):
                try:
                    try:
                        signals.check()  # a signal that came while claiming
                        result = run_trial(
                            trial, spec, arrays, datasets, store,
                            prune_from=None if confirming else first_prunable,
                            recorder=recorder,
                            keep_model=(lambda _: True) if confirming
                            else retention.qualifies,
                            stop_check=_stop_check(signals, limit))
                    finally:
                        recorder.close()
                    frozen = claimer.tell(trial, result.val_loss)
                    completed = True
                    failures_in_a_row = 0
                except optuna.TrialPruned:
                    frozen = claimer.tell(trial, state=TrialState.PRUNED)
                    failures_in_a_row = 0
                except Interrupted:
                    claimer.give_back(trial, spent=_spent(trial, time.monotonic() - t0))
                    _drop_model(retention, claimed, completed)
                    raise
                except optuna.exceptions.UpdateFinishedTrialError:
                    # Declared dead by another worker (a database outage longer than the grace
                    # period stops heartbeats): its parameters are already queued again.
                    _log.warning("trial %d was failed by another worker while this one was "
                                 "unreachable; its parameters are queued again", trial.number)
                    _drop_model(retention, claimed, completed)
                    continue
                except DatabaseGone:
                    raise  # nothing can be recorded: its heartbeat stops, and it is retried
                except (Exception, TrialTimedOut) as exc:  # noqa: BLE001 - recorded, not fatal
                    if signals.received is not None:
                        # Stopping: whatever else ended the trial meanwhile, it is given back.
                        claimer.give_back(trial, spent=_spent(trial, time.monotonic() - t0))
                        _drop_model(retention, claimed, completed)
                        raise Interrupted(signals.received) from None
                    if limit.fired:
                        reason = _timed_out_reason(claimed.timeout)
                    else:
                        reason = _reason(exc)
                    if progress is None and not (limit.fired or isinstance(exc, TrialDiverged)):
                        _log.warning("trial %d failed: %s", trial.number, reason)
                    try:
                        recorder.attrs(_failed_attrs(trial, reason, time.monotonic() - t0))
                        frozen = claimer.tell(trial, state=TrialState.FAIL)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        continue
                    finally:
                        _drop_model(retention, claimed, completed)
                    failures_in_a_row += 1
            if frozen.state in (TrialState.COMPLETE, TrialState.PRUNED):
                # Told already: what pruning meets is no longer the trial's failure. After a
                # pruned trial too, for a keep_models lowered meanwhile.
                retention.prune()
                figures.after_trial()
            if progress is not None:
                progress(_outcome(storage, claimer.study_id, frozen, time.monotonic() - t0,
                                  reason))
            if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise RuntimeFailure(f"{failures_in_a_row} trials in a row failed, stopping "
                                     f"this worker; last error: {reason}")


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """TensorFlow, Keras and the data are hundreds of thousands of objects that live as long
    as the worker. Frozen, the collector no longer scans them, and the full collection every
    ``GC_EVERY`` trials costs a fifth of what it did (0.1 s against 0.5 s on the demo).
    No collection first (0.5 s): what garbage the set-up left is kept until the end, once.
    Unfrozen at the end, so that a process that runs several studies in turn can free them.

    Young collections run every ``YOUNG_THRESHOLD`` allocations instead of Python's 700:
    tracing a model's functions makes objects by the hundred thousand, which live as long as
    the trial. At 700 they were promoted so fast that the collector also ran a full
    collection every three trials or so, besides ``GC_EVERY``'s (measured on the overhead
    benchmark's network: 54 ms a trial in the collector at 700, 29 ms at 10,000)."""
    threshold = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, *threshold[1:])
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@contextmanager
def _final_figures(figures: FigurePublisher) -> Iterator[None]:
    """The last figure update when the worker stops: its budget is spent, its cap reached, or
    it was interrupted (a signal while updating is remembered, not raised). Not after other
    errors: with the database gone the update would only wait for it."""
    try:
        yield
    except Interrupted:
        figures.final()
        raise
    except BaseException:
        raise
    else:
        figures.final()


class SqlRecorder:
    """A trial's attributes in one transaction per call (``optuna_sql``), where Optuna's API
    takes one per value; an epoch's value and curves in one transaction too, written where
    ``Trial.report`` writes them.

    Epochs are written by a thread of their own, in order, so training never waits for the
    database: the pruner reads this trial's values from the trial's own copy, updated at
    once (:func:`tuner.budget.remember_report`; its curve and attributes too, which
    :meth:`tuner.budget.Claimer.tell` returns). Epochs that come within ``interval`` seconds
    of the last write (``$TUNER_EPOCH_WRITE_INTERVAL``, 1 s), or queue up while the database
    is slow, go in one transaction: a GPU trains a small model's epoch in a fraction of a
    second, and a write per epoch would cost more than the epoch. Nothing that decides reads
    them sooner: a pruner compares with finished trials, and heartbeats have their own thread;
    the dashboard's live curve and an epoch budget's count lag by at most the interval.
    :meth:`attrs` first has every epoch written at once, so a trial's last attributes, and its
    tell, come after its curve. A refusal (another worker judged the trial dead) is raised at
    the next epoch or at :meth:`attrs`.
    """

    def __init__(self, trial: optuna.Trial, storage: RDBStorage, trial_id: int,
                 interval: float | None = None) -> None:
        self.trial, self.storage, self.trial_id = trial, storage, trial_id
        self.interval = epoch_write_interval() if interval is None else interval
        self._changed = threading.Condition()
        self._queued: list[tuple[int, float]] = []
        self._curve: dict[str, list[float]] = {}
        self._writing = self._closing = self._hurry = False
        self._last_write = -math.inf  # monotonic seconds: the first epoch is written at once
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def attrs(self, values: dict[str, Any], system: dict[str, Any] | None = None) -> None:
        self.flush()

        def write() -> None:
            with self.storage.engine.begin() as conn:
                optuna_sql.set_trial_user_attrs(conn, self.trial_id, values)
                if system:
                    optuna_sql.set_trial_system_attrs(conn, self.trial_id, system)

        retry_on_disconnect(self.storage, write)
        remember_attrs(self.trial, values, system)

    def epoch(self, step: int, value: float, curve: dict[str, list[float]]) -> None:
        self._raise_refusal()
        remember_report(self.trial, step, value)
        with self._changed:
            self._queued.append((step, value))
            self._curve = {key: list(points) for key, points in curve.items()}
            remember_attrs(self.trial, {attrs.CURVE: self._curve})
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_epochs, daemon=True,
                                                name=f"tuner-epochs-{self.trial.number}")
                self._thread.start()
            self._changed.notify_all()

    def flush(self) -> None:
        """Wait until every epoch reported so far is written (or refused: raised here)."""
        with self._changed:
            self._hurry = True  # what is queued is written now, not at the interval's end
            self._changed.notify_all()
            while self._queued or self._writing:
                self._changed.wait()
            self._hurry = False
        self._raise_refusal()

    def close(self) -> None:
        """Stop the writing thread once what is queued is written; raises nothing."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _raise_refusal(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_epochs(self) -> None:
        while True:
            with self._changed:
                while not self._queued and not self._closing:
                    self._changed.wait()
                while self._queued and not (self._closing or self._hurry):
                    left = self._last_write + self.interval - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)  # later epochs join this write
                if not self._queued:
                    return
                self._last_write = time.monotonic()
                reports, curve = self._queued, self._curve
                self._queued, self._writing = [], True
            error = self._write(reports, curve) if self._error is None else None
            with self._changed:
                self._writing = False
                self._error = self._error or error
                self._changed.notify_all()

    def _write(self, reports: list[tuple[int, float]],
               curve: dict[str, list[float]]) -> BaseException | None:
        def write() -> bool:
            with self.storage.engine.begin() as conn:
                return optuna_sql.report_epochs(conn, self.trial_id, reports,
                                                {attrs.CURVE: curve})

        try:
            if retry_on_disconnect(self.storage, write):
                return None
            return optuna.exceptions.UpdateFinishedTrialError(
                f"trial #{self.trial.number} is no longer running: another worker judged it "
                "dead")
        except Exception as exc:  # noqa: BLE001 - raised in the training thread instead
            return exc


def _drop_model(retention: Retention, claimed: Claimed, completed: bool) -> None:
    """The model of a trial that did not complete goes (:meth:`Retention.drop`)."""
    if not completed:
        retention.drop(claimed.trial_id, claimed.trial.user_attrs.get(attrs.MODEL_ARTIFACT))


def _failed_attrs(trial: optuna.Trial, reason: str, seconds: float) -> dict[str, Any]:
    """Why a trial failed, and what it spent (:func:`_spent`)."""
    return {attrs.FAIL_REASON: reason, **_spent(trial, seconds)}


def _spent(trial: optuna.Trial, seconds: float) -> dict[str, Any]:
    """When a trial ended in training (a timeout, a NaN loss, an error in the model, a stop
    signal), the epochs it trained and for how long: they were spent all the same."""
    if attrs.EPOCHS_RUN in trial.user_attrs:
        return {}
    curve = trial.user_attrs.get(attrs.CURVE) or {}
    return {attrs.EPOCHS_RUN: len(curve.get("val_loss", [])), attrs.SECONDS: round(seconds, 3)}


def artifact_store(study: optuna.Study, override: str | None
                   ) -> optuna.artifacts.FileSystemArtifactStore:
    """The study's artifact directory: ``--artifacts``, else the one recorded at creation."""
    path = artifacts_dir(override, study.user_attrs.get(attrs.ARTIFACTS))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = "" if override or os.environ.get("TUNER_ARTIFACTS") else \
            " (recorded when the study was created; --artifacts DIR or $TUNER_ARTIFACTS " \
            "overrides it)"
        raise RuntimeFailure(f"artifact directory {path}{where}: {exc.strerror}") from None
    return optuna.artifacts.FileSystemArtifactStore(str(path))


class _TimedOut(Exception):
    """``--timeout`` passed while the worker waited for a slot."""


class _Heartbeat:
    """Records the trial's heartbeat every interval from a thread, so a dead worker is seen.

    Every grace period it also looks for other workers' dead trials (``sweep``), so a dead
    trial is retried within about two grace periods even while every live worker is busy
    with a long trial and nobody is claiming a new one. A trial still training two grace
    periods past its ``trial_timeout`` never reached its next batch, where the limit is
    checked (stuck inside a native call, say): it is failed from here and the process ends
    with ``hung_exit``, so that its slot is free again (the supervisor starts a fresh one).
    """

    def __init__(self, storage: RDBStorage, claimed: Claimed,
                 sweep: Callable[[], None] | None = None, hung_exit: int = 1) -> None:
        self.storage, self.claimed, self.sweep = storage, claimed, sweep
        self.hung_exit = hung_exit
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="tuner-heartbeat", daemon=True)
        timeout = claimed.timeout
        self.hung_at = None if timeout is None else \
            time.monotonic() + timeout + 2 * grace_period(storage)

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval() or 10
        next_sweep = time.monotonic() + grace_period(self.storage)
        while not self.stop.wait(interval):  # the claim wrote the first beat
            if self.hung_at is not None and time.monotonic() >= self.hung_at:
                self._end_hung_trial()
            try:
                self.storage.record_heartbeat(self.claimed.trial_id)
            except Exception as exc:  # noqa: BLE001 - keep beating once the database is back
                _log.warning("heartbeat failed: %s", exc)
            if self.sweep is not None and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + grace_period(self.storage)
                try:
                    self.sweep()
                except Exception as exc:  # noqa: BLE001 - the next claim sweeps again
                    _log.warning("looking for dead trials failed: %s", exc)

    def _end_hung_trial(self) -> None:
        trial = self.claimed.trial
        reason = _timed_out_reason(self.claimed.timeout) + " and did not stop"
        _log.error("trial %d %s; ending this process", trial.number, reason.split(": ", 1)[-1])
        try:
            trial.set_user_attr(attrs.FAIL_REASON, reason)
            trial.study.tell(trial, state=TrialState.FAIL)
        except Exception as exc:  # noqa: BLE001 - a stale heartbeat fails it anyway
            _log.warning("could not record the hung trial: %s", exc)
        logging.shutdown()
        os._exit(self.hung_exit)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class _TimeLimit:
    """A trial's ``trial_timeout``, counted from now: :meth:`check`, called between batches
    (``run_trial``'s ``stop_check``), raises :class:`TrialTimedOut` once it has passed.

    ``fired`` stays true afterwards, so the trial fails for its time whatever a library
    makes of the exception on its way out.
    """

    def __init__(self, seconds: float | None) -> None:
        self.fired = False
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.fired = True
            raise TrialTimedOut


def _stop_check(signals: _interrupts_raise, limit: _TimeLimit) -> Callable[[], None]:
    """What a trial asks between batches: was the worker told to stop, is its time up?"""
    def check() -> None:
        signals.check()
        limit.check()

    return check


def _timed_out_reason(seconds: float | None) -> str:
    return f"TrialTimedOut: trained longer than trial_timeout = {duration(seconds or 0)}"


class _interrupts_raise:  # noqa: N801 - used as a context manager like contextlib helpers
    """SIGTERM, SIGINT and SIGHUP (:data:`tuner.settings.STOP_SIGNALS`) stop the worker once;
    only while the worker waits for a free slot do they raise at once.

    Elsewhere the signal is remembered and :meth:`check` raises it at the next safe point:
    between two batches of a trial (``run_trial``'s ``stop_check``), or between claiming,
    training and telling, so the budget bookkeeping is never cut in half. Raised from the
    handler inside training, it could land in TensorFlow's C++ code, which made it a
    ``SystemError`` and hung the process. A second signal (Ctrl-C reaches a whole process
    group, and the supervisor forwards SIGTERM too) is ignored while the trial is given back.
    """

    def __enter__(self) -> _interrupts_raise:
        self.received: str | None = None
        self.armed = False

        def handler(signum: int, frame: FrameType | None) -> None:
            if self.received is not None:
                return
            self.received = signal.Signals(signum).name
            if self.armed:
                self.armed = False
                raise Interrupted(self.received)

        self.previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        return self

    def check(self) -> None:
        if self.received is not None:
            raise Interrupted(self.received)

    def sleep(self, seconds: float) -> None:
        """Wait for a free slot; a signal ends the wait (and the worker) at once."""
        self.check()
        self.armed = True
        try:
            time.sleep(seconds)
        finally:
            self.armed = False

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:500]}" if text else type(exc).__name__


def _outcome(storage: RDBStorage, study_id: int, frozen: optuna.trial.FrozenTrial,
             seconds: float, reason: str) -> Outcome:
    def best() -> dict[str, Any] | None:  # two queries, where Study.best_trial loads it all
        with storage.engine.connect() as conn:
            return optuna_sql.best_trial(conn, study_id)

    found = retry_on_disconnect(storage, best)
    best_value = None if found is None else found["value"]
    best_number = None if found is None else found["number"]
    value = frozen.value
    reported = [v for v in frozen.intermediate_values.values() if math.isfinite(v)]
    if frozen.state != TrialState.COMPLETE and reported:
        value = min(reported)  # its best epoch, as `tuner trials` shows (Optuna keeps the last)
    return Outcome(number=frozen.number, state=frozen.state.name,
                   epochs_run=frozen.user_attrs.get(attrs.EPOCHS_RUN),
                   value=None if value is None or math.isnan(value) else value,
                   best_value=best_value, best_number=best_number, seconds=seconds,
                   reason=reason or frozen.user_attrs.get(attrs.FAIL_REASON, ""))
