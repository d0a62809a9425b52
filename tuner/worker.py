"""The worker loop: claim a trial within the study's budget, train it, tell the result.

One loop runs per process (one process per GPU, see :mod:`tuner.supervisor`). The data is
loaded once per process and reused by every trial. The study's ``n_trials`` holds across all
workers: a trial is only created under :func:`tuner.storage.budget_lock`, counting the trials
that are finished, running or queued, so the study ends with exactly ``n_trials`` finished
trials however many workers share it. A worker whose trial is interrupted (SIGTERM, Ctrl-C)
gives it back (failed with reason "interrupted" and queued again) before exiting.

A trial whose process died is found by any other worker when it claims its next trial: its
heartbeat is older than the grace period (Optuna's stale-trial check), or it never beat at all
(the process died between creating it and its first heartbeat). Either way it is failed and its
parameters queued again, so no trial stays RUNNING for ever.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import TrialState

from tuner import study as studies
from tuner.errors import RuntimeFailure
from tuner.storage import (
    MAX_RETRY,
    RetryAfresh,
    artifacts_dir,
    budget_lock,
    retry_interval,
    retry_on_disconnect,
)

_log = logging.getLogger("tuner.worker")
COUNTED = ("RUNNING", "WAITING", "COMPLETE", "PRUNED")
MAX_FAILURES_IN_A_ROW = 5
POLL_SECONDS = 2.0


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT so the running trial can be given back."""


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


def work(storage: RDBStorage, study_name: str, *, n_trials: int | None = None,
         timeout: float | None = None, artifacts: str | None = None, seed_offset: int = 0,
         progress: Callable[[Outcome], None] | None = None) -> Summary:
    """Run trials of ``study_name`` until its budget (or this worker's cap) is spent."""
    study, spec = studies.load(study_name, storage)
    study.sampler = studies.make_sampler(spec, seed_offset)
    if _finished(storage, study) >= spec.n_trials:  # say so before paying for TensorFlow
        return Summary(0, f"study budget of {spec.n_trials} trials is spent")
    from tuner.tfsetup import init_tensorflow

    init_tensorflow()  # TensorFlow only where trials run
    from tuner.data import load_arrays, make_datasets
    from tuner.trial import TrialDiverged, run_trial

    arrays = load_arrays(spec.data, seed=spec.seed or 0)
    datasets = make_datasets(arrays, spec.model.batch_size, seed=spec.seed or 0)
    store = artifact_store(study, artifacts)
    started = time.monotonic()
    failures_in_a_row = 0
    ran = 0
    with _interrupts_raise() as signals:
        while True:
            signals.check()
            if n_trials is not None and ran >= n_trials:
                return Summary(ran, f"ran --n-trials {n_trials}")
            if timeout is not None and time.monotonic() - started >= timeout:
                return Summary(ran, f"reached --timeout {timeout:g}s")
            trial = claim_trial(study, storage, spec.n_trials)
            if trial is None:
                return Summary(ran, f"study budget of {spec.n_trials} trials is spent")
            ran += 1
            t0 = time.monotonic()
            reason = ""
            with _Heartbeat(storage, trial._trial_id, lambda: sweep_dead_trials(study, storage)):
                try:
                    try:
                        signals.arm()
                        trial.set_user_attr("pid", os.getpid())
                        result = run_trial(trial, spec, arrays, datasets, store)
                    finally:
                        signals.disarm()
                    frozen = study.tell(trial, result.val_loss)
                    failures_in_a_row = 0
                except optuna.TrialPruned:
                    frozen = study.tell(trial, state=TrialState.PRUNED)
                    failures_in_a_row = 0
                except Interrupted:
                    give_back(study, storage, trial, "interrupted")
                    raise
                except optuna.exceptions.UpdateFinishedTrialError:
                    # Declared dead by another worker (a database outage longer than the grace
                    # period stops heartbeats): its parameters are already queued again.
                    _log.warning("trial %d was failed by another worker while this one was "
                                 "unreachable; its parameters are queued again", trial.number)
                    continue
                except Exception as exc:  # noqa: BLE001 - any trial error is recorded, not fatal
                    if signals.received is not None:
                        # The interrupt landed where a library turned it into another error.
                        give_back(study, storage, trial, "interrupted")
                        raise Interrupted(signals.received) from None
                    reason = _reason(exc)
                    if not isinstance(exc, TrialDiverged):
                        _log.warning("trial %d failed: %s", trial.number, reason)
                    try:
                        trial.set_user_attr("fail_reason", reason)
                        frozen = study.tell(trial, state=TrialState.FAIL)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        continue
                    failures_in_a_row += 1
            if progress is not None:
                progress(_outcome(study, frozen, time.monotonic() - t0, reason))
            if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise RuntimeFailure(f"{failures_in_a_row} trials in a row failed, stopping "
                                     f"this worker; last error: {reason}")


def claim_trial(study: optuna.Study, storage: RDBStorage, budget: int) -> optuna.Trial | None:
    """A new (or queued) trial if the study's budget allows one, else ``None``.

    While every remaining slot is held by running trials this waits: one of them may still
    die and be queued again, and someone must be there to run it. The new trial's first
    heartbeat is written before the budget lock is released; the sampler runs after it is
    released, so a sampler that reads the whole history (TPE) never makes other workers wait.
    """
    while True:
        trial_id = retry_on_disconnect(storage, lambda: _claim_once(study, storage, budget))
        if trial_id is None:
            return None
        if trial_id is not _WAIT:
            return retry_on_disconnect(storage, lambda i=trial_id: _sampled_trial(study, i))
        time.sleep(POLL_SECONDS)


_WAIT = object()


def _sampled_trial(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """What ``Study.ask`` does once it has a trial id: drop the cached history, then sample."""
    study._thread_local.cached_all_trials = None  # as Study.ask does (optuna 5)
    return optuna.Trial(study, trial_id)


def sweep_dead_trials(study: optuna.Study, storage: RDBStorage) -> None:
    """Fail (and queue again) other workers' dead trials, under the budget lock."""
    if not storage.get_heartbeat_interval():
        return
    with budget_lock(storage, study.study_name):
        _sweep(study, storage)


def _claim_once(study: optuna.Study, storage: RDBStorage, budget: int) -> object:
    """Under the budget lock: count, then take a queued trial or create one (no sampling)."""
    with budget_lock(storage, study.study_name):
        if _sweep_due(storage):
            _sweep(study, storage)
        counts = studies.count_states(storage, study._study_id)
        if counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) >= budget:
            return None
        if sum(counts.get(s, 0) for s in COUNTED) >= budget:
            return _WAIT
        # Through the study's own (caching) storage, as Study.ask does, so the trial's
        # parameters can be set through it later.
        trial_id = None
        if counts.get("WAITING", 0):
            trial_id = _pop_waiting(study._storage, study._study_id)
        if trial_id is None:
            trial_id = study._storage.create_new_trial(study._study_id)
        if storage.get_heartbeat_interval():
            storage.record_heartbeat(trial_id)
        return trial_id


def _pop_waiting(storage: optuna.storages.BaseStorage, study_id: int) -> int | None:
    """The first queued trial, now RUNNING (the caller holds the budget lock)."""
    for queued in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(queued._trial_id, state=TrialState.RUNNING):
                return queued._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _sweep_due(storage: RDBStorage) -> bool:
    """At most one dead-trial sweep per heartbeat interval per process, when claiming.

    A dead trial cannot be told from a live one sooner than that, and a worker claiming in a
    tight loop (tiny models, many workers) would otherwise hold the lock for the sweep's
    queries on every claim. The heartbeat thread sweeps every grace period as well.
    """
    interval = storage.get_heartbeat_interval()
    now = time.monotonic()
    if not interval or now - getattr(storage, "tuner_last_sweep", -math.inf) < interval:
        return False
    storage.tuner_last_sweep = now  # type: ignore[attr-defined]
    return True


def _sweep(study: optuna.Study, storage: RDBStorage) -> None:
    if _may_judge_others(storage):
        fail_stale_trials(study)
        _fail_silent_trials(study, storage)


def _finished(storage: RDBStorage, study: optuna.Study) -> int:
    counts = retry_on_disconnect(storage, lambda: studies.count_states(storage, study._study_id))
    return counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)


def _may_judge_others(storage: RDBStorage) -> bool:
    """False for a while after the database came back from an outage or a restart.

    During an outage nobody can beat; right after it every heartbeat looks old. Judging
    trials dead then would fail live ones, so the other workers first get a grace period (plus
    the longest retry pause) to beat again. A process that slept through a restart only
    sees it in the server's start time, hence the PostgreSQL check.
    """
    wait = _grace(storage) + retry_interval(10) + (storage.get_heartbeat_interval() or 0)
    recovered = getattr(storage, "last_recovered", None)
    if recovered is not None and time.monotonic() - recovered < wait:
        return False
    if storage.engine.url.get_backend_name() == "postgresql":
        query = sqlalchemy.text("SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())")
        with storage.engine.connect() as conn:
            if float(conn.execute(query).scalar_one()) < wait:
                return False
    return True


def _grace(storage: RDBStorage) -> float:
    interval = storage.get_heartbeat_interval() or 0
    return float(getattr(storage, "grace_period", None) or 2 * interval)


def _fail_silent_trials(study: optuna.Study, storage: RDBStorage) -> None:
    """Fail RUNNING trials that never recorded a heartbeat and are older than the grace period.

    Optuna's stale check skips trials without any heartbeat; a process killed between
    creating a trial and its first heartbeat would leave one RUNNING for ever.
    """
    if not storage.get_heartbeat_interval():
        return
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=_grace(storage))
    query = sqlalchemy.text(
        "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h "
        "ON h.trial_id = t.trial_id WHERE t.study_id = :sid AND t.state = 'RUNNING' "
        "AND h.trial_id IS NULL AND t.datetime_start < :cutoff")
    with storage.engine.connect() as conn:
        ids = [row[0] for row in conn.execute(query, {"sid": study._study_id,
                                                      "cutoff": cutoff})]
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial_id in ids:
        try:
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if retry is not None:
            retry(study, storage.get_trial(trial_id))


def give_back(study: optuna.Study, storage: RDBStorage, trial: optuna.Trial,
              reason: str) -> None:
    """Fail ``trial`` with ``reason`` and queue its parameters again, as one budget step."""
    with budget_lock(storage, study.study_name):
        try:
            trial.set_user_attr("fail_reason", reason)
            frozen = study.tell(trial, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another worker already judged it dead and queued it again
        RetryAfresh(max_retry=MAX_RETRY)(study, frozen)


def artifact_store(study: optuna.Study, override: str | None
                   ) -> optuna.artifacts.FileSystemArtifactStore:
    """The study's artifact directory: ``--artifacts``, else the one recorded at creation."""
    path = artifacts_dir(override, study.user_attrs.get(studies.ARTIFACTS_ATTR))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeFailure(f"artifact directory {path}: {exc.strerror}") from None
    return optuna.artifacts.FileSystemArtifactStore(str(path))


class _Heartbeat:
    """Records the trial's heartbeat every interval from a thread, so a dead worker is seen.

    Every grace period it also looks for other workers' dead trials (``sweep``), so a dead
    trial is retried within about two grace periods even while every live worker is busy
    with a long trial and nobody is claiming a new one.
    """

    def __init__(self, storage: RDBStorage, trial_id: int,
                 sweep: Callable[[], None] | None = None) -> None:
        self.storage, self.trial_id, self.sweep = storage, trial_id, sweep
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="tuner-heartbeat", daemon=True)

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval() or 10
        next_sweep = time.monotonic() + _grace(self.storage)
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 - keep beating once the database is back
                _log.warning("heartbeat failed: %s", exc)
            if self.sweep is not None and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + _grace(self.storage)
                try:
                    self.sweep()
                except Exception as exc:  # noqa: BLE001 - the next claim sweeps again
                    _log.warning("looking for dead trials failed: %s", exc)
            if self.stop.wait(interval):
                return

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class _interrupts_raise:  # noqa: N801 - used as a context manager like contextlib helpers
    """SIGTERM and SIGINT stop the worker once; only while a trial trains do they raise at once.

    Outside a trial (claiming one, telling a result) the signal is remembered and
    :meth:`check` raises it at the next safe point, so the budget bookkeeping is never cut in
    half. A second signal (Ctrl-C reaches a whole process group, and the supervisor forwards
    SIGTERM too) is ignored while the trial is given back.
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

        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def check(self) -> None:
        if self.received is not None:
            raise Interrupted(self.received)

    def arm(self) -> None:
        self.check()
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:500]}" if text else type(exc).__name__


def _outcome(study: optuna.Study, frozen: optuna.trial.FrozenTrial, seconds: float,
             reason: str) -> Outcome:
    try:
        best = study.best_trial
        best_value, best_number = best.value, best.number
    except ValueError:
        best_value = best_number = None
    value = frozen.value
    if value is None and frozen.intermediate_values:
        value = frozen.intermediate_values[max(frozen.intermediate_values)]
    return Outcome(number=frozen.number, state=frozen.state.name,
                   epochs_run=frozen.user_attrs.get("epochs_run"),
                   value=None if value is None or math.isnan(value) else value,
                   best_value=best_value, best_number=best_number, seconds=seconds,
                   reason=reason or frozen.user_attrs.get("fail_reason", ""))
