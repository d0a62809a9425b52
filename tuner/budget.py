"""The claim path: how a worker gets its next trial within the study's budget.

The budget belongs to the study, not to a worker: ``n_trials`` (and, if the study file sets
them, an epoch budget and a time budget) hold across every worker on every node. Under one
lock shared by all of them (:func:`budget_lock`), a worker asking for work counts the study's
trials and decides, in this order (:func:`decide`):

====  ============================================================  =========================
step  when                                                          the worker
====  ============================================================  =========================
1     finished >= n_trials, or the epoch or time budget is spent    stops
2     a queued trial exists and finished + running < n_trials       takes the oldest queued
3     finished + running + queued < n_trials                        creates a new trial
4     otherwise                                                     waits, then asks again
====  ============================================================  =========================

*finished* is COMPLETE + PRUNED; FAIL never counts. A *queued* (WAITING) trial holds the
parameters of a trial whose worker died or gave it back, so step 2 runs it before anything
new. A worker waits (step 4) only while every slot left is held by a running trial: one of them
may still die and be queued again, and someone must be there to run it. The wait obeys
signals. The budget is read from the study at every claim, so a changed ``n_trials`` holds at
the next claim of every running worker. Epochs count every reported epoch of every trial
(pruned, failed and running ones too: GPU time was spent on them); the time budget counts from
the first claim. With an epoch or time budget a running trial always finishes, so the study
may end a little past it. A confirm step's runs (:mod:`tuner.confirm`) grow ``n_trials`` and the
epoch budget by what they need, and start whatever the epoch and time budgets say: a user who
asks for them after the search's epochs or hours are spent (or while its last trials overrun
them) still gets them (step 1 lets them through, step 2 takes only them, and no new trial is
created). The search's trials and epochs are counted apart from theirs: a queued search trial
never takes a run's slot, and runs that stop early leave the search no epochs; and while a run
is running, workers wait rather than stop, as in step 4.

Dead trials: a running trial whose heartbeat is older than the grace period, or that this
process has seen without any heartbeat for a grace period, is failed and its parameters
queued again, at most :data:`MAX_RETRY` times (a trial that kills its worker each time is not
retried for ever). A trial given back on SIGTERM or Ctrl-C is queued without counting toward
that cap: an interrupt is not the trial's fault.

This is the only module that touches Optuna's internals (a study's storage and id, a trial's
id and cached epochs, the storage's stale-trial query).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import enum
import fcntl
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import exc as sa_exc

from tuner import attrs, optuna_sql
from tuner.render import count, duration
from tuner.storage import retry_interval, retry_on_disconnect

MAX_RETRY = 3  # times the parameters of a trial whose worker died are run again
POLL_SECONDS = 2.0  # how often a waiting worker asks again
DEAD = "its worker stopped beating for the grace period (killed, or cut off from the database)"
LOST_LOCK = "created after its worker lost the budget lock (database connection); not run"


class Decision(enum.Enum):
    STOP = "stop"
    TAKE = "take a queued trial"
    CREATE = "create a trial"
    WAIT = "wait"


@dataclass(frozen=True)
class Budget:
    """What the study may spend; ``None`` means no limit of that kind."""

    n_trials: int | None = None
    epochs: int | None = None
    seconds: float | None = None
    clock_started: float | None = None  # UTC seconds of the first claim
    trial_timeout: float | None = None  # not a limit on the study: on each trial it starts
    keep_models: int | None = 5  # nor this: how many models the study keeps (None: all)
    # The search's own trials and epochs: ``n_trials`` and ``epochs`` less what a confirm
    # step's runs take on top (``None``: all of them). Runs that stop early, or a queued search
    # trial, never take what the runs were given.
    search_trials: int | None = None
    search_epochs: int | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any], clock_started: float | None = None,
                  confirm_runs: int = 0, confirm: dict[str, Any] | None = None) -> Budget:
        """From a stored spec (the JSON form of :class:`tuner.spec.StudySpec`), grown by the
        ``confirm_runs`` a confirm step queued (see :mod:`tuner.confirm`; ``confirm``: its
        request): they are extra, on top of what the search had spent when they were queued
        if that was more than its budget."""
        n, epochs = spec.get("n_trials"), spec.get("epoch_budget")
        extra, confirm = confirm_runs, confirm or {}
        search_trials, search_epochs = n, epochs
        if extra and n is not None:
            search_trials = max(n, int(confirm.get("searched", 0)))
            n = search_trials + extra
        if extra and epochs is not None:
            search_epochs = max(epochs, int(confirm.get("searched_epochs", 0)))
            epochs = search_epochs + extra * int(spec.get("model", {}).get("epochs", 0))
        return cls(n, epochs, spec.get("time_budget"), clock_started, spec.get("trial_timeout"),
                   spec.get("keep_models", 5), search_trials, search_epochs)

    def describe(self) -> str:
        """``24 trials``, ``600 epochs`` or ``8h``, the way a user wrote the budget."""
        parts = []
        if self.n_trials is not None:
            parts.append(count(self.n_trials, "trial"))
        if self.epochs is not None:
            parts.append(f"{self.epochs} epochs")
        if self.seconds is not None:
            parts.append(duration(self.seconds))
        return ", ".join(parts) or "no limit"

    def progress(self, usage: Usage, now: float | None = None) -> str:
        """``3 of 24 trials finished``, with the epochs and time spent when those are limited."""
        n = f" of {self.n_trials}" if self.n_trials is not None else ""
        total = usage.finished if self.n_trials is None else self.n_trials
        parts = [f"{usage.finished}{n} {'trial' if total == 1 else 'trials'} finished"]
        if self.epochs is not None:
            parts.append(f"{usage.epochs} of {self.epochs} epochs")
        if self.seconds is not None:
            spent = 0.0 if self.clock_started is None else \
                max(0.0, (now or time.time()) - self.clock_started)
            parts.append(f"{duration(round(min(spent, self.seconds)))} of "
                         f"{duration(self.seconds)}")  # a spent budget stops counting
        return ", ".join(parts)


@dataclass(frozen=True)
class Usage:
    """A study's trials by state, and the epochs they trained."""

    complete: int = 0
    pruned: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0
    epochs: int = 0
    # A confirm step's runs: queued, running, finished, and the epochs they trained
    confirm_waiting: int = 0
    confirm_running: int = 0
    confirm_finished: int = 0
    confirm_epochs: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @classmethod
    def from_counts(cls, counts: dict[str, int], epochs: int = 0,
                    confirm: dict[str, int] | None = None) -> Usage:
        """``confirm``: the confirm runs' counts by state name, and their ``epochs``."""
        confirm = confirm or {}
        return cls(counts.get("COMPLETE", 0), counts.get("PRUNED", 0), counts.get("RUNNING", 0),
                   counts.get("WAITING", 0), counts.get("FAIL", 0), epochs,
                   confirm.get("WAITING", 0), confirm.get("RUNNING", 0),
                   confirm.get("COMPLETE", 0) + confirm.get("PRUNED", 0), confirm.get("epochs", 0))


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str = ""  # why a worker stops, for its last line
    confirm_only: bool = False  # TAKE: the search's budget is spent: only confirm runs


def decide(usage: Usage, budget: Budget, now: float) -> Verdict:
    """The rules of the module docstring, as a pure function (``now``: UTC seconds)."""
    n = budget.n_trials
    if n is not None and usage.finished >= n:
        return Verdict(Decision.STOP, f"study budget of {count(n, 'trial')} is spent")
    search_epochs = budget.epochs if budget.search_epochs is None else budget.search_epochs
    out_of_epochs = (search_epochs is not None
                     and usage.epochs - usage.confirm_epochs >= search_epochs)
    out_of_time = (budget.seconds is not None and budget.clock_started is not None
                   and now - budget.clock_started >= budget.seconds)
    # Confirm runs start whatever these budgets say; while one runs it may still die and be
    # queued again, and someone must be there to run it (as step 4 waits for running trials).
    confirming = usage.confirm_waiting or usage.confirm_running
    if out_of_epochs and not confirming:
        return Verdict(Decision.STOP, f"study budget of {search_epochs} epochs is spent")
    if out_of_time and not confirming:
        return Verdict(Decision.STOP, f"study time budget of {duration(budget.seconds)} "
                                      "is spent")
    room = n is None or usage.finished + usage.running < n
    search_room = not (out_of_epochs or out_of_time) and (
        budget.search_trials is None or usage.finished - usage.confirm_finished
        + usage.running - usage.confirm_running < budget.search_trials)
    if usage.waiting and room and search_room:
        return Verdict(Decision.TAKE)
    if usage.confirm_waiting and room:  # only confirm runs start now
        return Verdict(Decision.TAKE, confirm_only=True)
    if search_room and (n is None or usage.finished + usage.running + usage.waiting < n):
        return Verdict(Decision.CREATE)
    return Verdict(Decision.WAIT)


@dataclass(frozen=True)
class Claimed:
    """A trial this worker now holds: RUNNING, with its first heartbeat written."""

    trial: optuna.Trial
    trial_id: int
    timeout: float | None = None  # the study's trial_timeout when it was claimed
    keep_models: int | None = 5  # the study's keep_models then (None: every model)

    @property
    def confirms(self) -> int | None:
        """The trial whose configuration this one retrains (a confirm step's run), if any."""
        return self.trial._cached_frozen_trial.system_attrs.get(attrs.CONFIRMS)


class Claimer:
    """One worker's side of the claim path on one study (see the module docstring).

    ``clock`` (monotonic seconds) times the sweeps and how long a trial has gone without any
    heartbeat; tests pass their own. ``first_created(number)`` is called once, with the number
    of the first trial this claimer creates, before the sampler sees it: trial numbers are
    unique, so a worker can seed its sampler apart from the workers that started with it.
    """

    def __init__(self, study: optuna.Study, storage: RDBStorage,
                 clock: Callable[[], float] = time.monotonic,
                 first_created: Callable[[int], None] | None = None) -> None:
        self.study, self.storage, self.clock = study, storage, clock
        self._first_created = first_created
        self._last_sweep = -math.inf
        self._silent_since: dict[int, float] = {}
        self._sweep_lock = threading.Lock()  # the heartbeat thread sweeps too
        self._queued_now: list[int] = []  # trials the current claim's sweep queued again

    @property
    def study_id(self) -> int:
        return self.study._study_id

    # --- reading the budget -----------------------------------------------------------------

    def state(self) -> tuple[Usage, Budget]:
        """The study's usage and budget now, read in one connection."""
        with self.storage.engine.connect() as conn:
            found = optuna_sql.study_attrs(conn, self.study_id,
                                           (attrs.SPEC, attrs.CLOCK_STARTED, attrs.CONFIRM))
            budget = Budget.from_spec(found.get(attrs.SPEC) or {},
                                      found.get(attrs.CLOCK_STARTED),
                                      confirm_runs(conn, self.study_id)
                                      if attrs.CONFIRM in found else 0, found.get(attrs.CONFIRM))
            epochs = (optuna_sql.epochs_reported(conn, self.study_id)
                      if budget.epochs is not None else 0)
            confirm = (optuna_sql.confirm_runs_usage(conn, self.study_id, attrs.CONFIRMS)
                       if attrs.CONFIRM in found else None)
            usage = Usage.from_counts(optuna_sql.count_states(conn, self.study_id), epochs,
                                      confirm)
        return usage, budget

    def verdict(self) -> Verdict:
        """What a claim would decide now, without the lock (for a cheap early stop)."""
        usage, budget = retry_on_disconnect(self.storage, self.state)
        return decide(usage, budget, time.time())

    # --- claiming ---------------------------------------------------------------------------

    def claim(self, wait: Callable[[float], None] = time.sleep) -> Claimed | Verdict:
        """The next trial, or the :class:`Verdict` to stop. ``wait(seconds)`` between tries
        may raise to abandon the claim (a signal); no trial is held while it waits.

        The sampler runs after the lock is released, so a sampler that reads the whole
        history (TPE) never makes other workers wait.
        """
        while True:
            try:
                verdict, trial_id, budget, created = retry_on_disconnect(self.storage,
                                                                          self._claim_once)
            except _CreatedWithoutLock as lost:
                if lost.trial_id is not None:
                    self._discard(lost.trial_id)
                self._trim_queue(lost.queued)
                continue  # decide again, under the lock
            if created and self._first_created is not None:
                # from the study's caching storage, which holds the trial it just created
                number = retry_on_disconnect(
                    self.storage, lambda i=trial_id: self.study._storage.get_trial(i).number)
                self._first_created(number)
                self._first_created = None
            if trial_id is not None:
                trial = retry_on_disconnect(self.storage, lambda i=trial_id: self._trial(i))
                return Claimed(trial, trial_id, budget.trial_timeout, budget.keep_models)
            if verdict.decision is Decision.STOP:
                return verdict
            wait(POLL_SECONDS)

    def claim_once(self) -> tuple[Verdict, int | None]:
        return self._claim_once()[:2]

    def _claim_once(self) -> tuple[Verdict, int | None, Budget, bool]:
        """One decision under the lock: a RUNNING trial id with its first heartbeat, or none;
        and whether it was created (rather than taken from the queue).

        Raises :class:`_CreatedWithoutLock` if the lock's session ended before the decision was
        committed: the storage calls under it wait out an outage on connections of their own,
        so a trial they created may be one over the budget. A queued trial taken meanwhile is
        kept: taking it is one guarded state change that no other worker can repeat.
        """
        verdict: Verdict | None = None
        budget = Budget()
        trial_id = created = None
        self._queued_now = []
        try:
            with budget_lock(self.storage, self.study.study_name, strict=True):
                if self._sweep_due():
                    self._sweep()
                usage, budget = self.state()
                verdict = decide(usage, budget, time.time())
                if verdict.decision is Decision.TAKE:
                    trial_id = self._pop_waiting(verdict.confirm_only)
                if verdict.decision is Decision.CREATE or (
                        verdict.decision is Decision.TAKE and trial_id is None
                        and not verdict.confirm_only):
                    # Through the study's own (caching) storage, as Study.ask does, so the
                    # trial's parameters can be set through it later.
                    trial_id = created = self.study._storage.create_new_trial(self.study_id)
                if trial_id is not None:
                    if self.storage.get_heartbeat_interval():
                        self.storage.record_heartbeat(trial_id)
                    if budget.seconds is not None and budget.clock_started is None:
                        self.study.set_user_attr(attrs.CLOCK_STARTED, time.time())
        except LockLost:
            if created is not None or self._queued_now:
                raise _CreatedWithoutLock(created, self._queued_now) from None
            if verdict is None:
                raise
        assert verdict is not None  # the lock's exit raises only after the body ran
        return verdict, trial_id, budget, created is not None

    def _discard(self, trial_id: int) -> None:
        """Fail a trial created or queued without the lock, before anything ran (not queued
        again)."""
        def discard() -> None:
            self.storage.set_trial_user_attr(trial_id, attrs.FAIL_REASON, LOST_LOCK)
            self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)

        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            retry_on_disconnect(self.storage, discard)

    def _trim_queue(self, queued: list[int]) -> None:
        """Of the trials a sweep queued again without the lock, fail those still waiting
        beyond the budget: another worker may have filled the slot meanwhile, and a queued
        trial past the budget would wait for ever."""
        if not queued:
            return
        with budget_lock(self.storage, self.study.study_name):
            usage, budget = self.state()
            if budget.n_trials is None:
                return
            excess = usage.finished + usage.running + usage.waiting - budget.n_trials
            for trial_id in queued:
                if excess <= 0:
                    break
                if self.storage.get_trial(trial_id).state == TrialState.WAITING:
                    self._discard(trial_id)
                    excess -= 1

    def _trial(self, trial_id: int) -> optuna.Trial:
        """What ``Study.ask`` does once it has a trial id: drop the cached history."""
        self.study._thread_local.cached_all_trials = None  # as Study.ask does (optuna 5)
        return optuna.Trial(self.study, trial_id)

    def _pop_waiting(self, confirm_only: bool = False) -> int | None:
        """The oldest queued trial (of the confirm runs only, if ``confirm_only``), now
        RUNNING (the caller holds the budget lock)."""
        storage = self.study._storage
        for queued in storage.get_all_trials(self.study_id, deepcopy=False,
                                             states=(TrialState.WAITING,)):
            if confirm_only and attrs.CONFIRMS not in queued.system_attrs:
                continue
            try:
                if storage.set_trial_state_values(queued._trial_id, state=TrialState.RUNNING):
                    return queued._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    # --- finishing --------------------------------------------------------------------------

    def tell(self, trial: optuna.Trial, value: float | None = None,
             state: TrialState = TrialState.COMPLETE) -> FrozenTrial:
        """``Study.tell``, from the trial's own up-to-date copy: one write.

        Optuna's reads the trial back from the database before the write and again after it,
        14 of the trial's round trips for nothing this process does not already hold (its
        parameters, epochs and attributes: :func:`remember_report`, :func:`remember_attrs`).
        As there, a value that is not a finite number fails the trial, a pruned trial keeps
        its last epoch's value, and the sampler hears of the result first. Raises
        ``UpdateFinishedTrialError`` if the trial is no longer running (another worker
        judged it dead).

        On SQLite it holds the budget lock: SQLite ignores the ``SELECT ... FOR UPDATE`` with
        which Optuna makes a state change wait for another, so a sweep failing the trial at the
        same moment could succeed as well (the configuration would then run twice).
        """
        if _is_sqlite(self.storage):
            with budget_lock(self.storage, self.study.study_name):
                return self._tell(trial, value, state)
        return self._tell(trial, value, state)

    def _tell(self, trial: optuna.Trial, value: float | None, state: TrialState
              ) -> FrozenTrial:
        frozen = copy.deepcopy(trial._cached_frozen_trial)
        values: list[float] | None = None
        if state == TrialState.COMPLETE:
            if value is not None and math.isfinite(value):
                values = [float(value)]
            else:
                state = TrialState.FAIL
        elif state == TrialState.PRUNED and frozen.last_step is not None:
            last = frozen.intermediate_values[frozen.last_step]
            if math.isfinite(last):
                values = [float(last)]
        self.study._thread_local.cached_all_trials = None  # as Study.tell does (optuna 5)
        try:
            self.study.sampler.after_trial(optuna.pruners._filter_study(self.study, frozen),
                                           frozen, state, values)
        finally:
            self.study._storage.set_trial_state_values(frozen._trial_id, state, values)
        frozen.state, frozen.values = state, values
        frozen.datetime_complete = datetime.datetime.now()
        return frozen

    # --- giving back ------------------------------------------------------------------------

    def give_back(self, trial: optuna.Trial, reason: str = attrs.INTERRUPTED,
                  spent: dict[str, Any] | None = None) -> None:
        """Fail ``trial`` with ``reason`` and queue its parameters again, as one budget step.

        Not counted as a retry: the trial did nothing wrong. ``spent``: user attributes that
        say what it trained before it was stopped (epochs, seconds).
        """
        with budget_lock(self.storage, self.study.study_name):
            try:
                for key, value in (spent or {}).items():
                    trial.set_user_attr(key, value)
                trial.set_user_attr(attrs.FAIL_REASON, reason)
                frozen = self._tell(trial, None, TrialState.FAIL)  # the lock is held
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # another worker already judged it dead and queued it again
            self._requeue(frozen, counts_as_retry=False)

    def _requeue(self, failed: FrozenTrial, *, counts_as_retry: bool) -> bool:
        """Queue ``failed``'s parameters as a WAITING trial; ``False`` past the retry cap.

        Like Optuna's ``RetryHeartbeatStaleTrialCallback`` (same ``failed_trial`` and
        ``retry_history`` system attributes), but without the dead run's user attributes:
        its host, GPU and fail reason would be reported for the run that completes.
        """
        # not the dead run's saved model (retention deletes it with the failed trial)
        system = {k: v for k, v in failed.system_attrs.items()
                  if not k.startswith(optuna_sql.ARTIFACTS_ATTR_PREFIX)}
        history = list(system.get("retry_history", []))
        if counts_as_retry:
            history.append(failed.number)
            if len(history) > MAX_RETRY:
                return False
        system.setdefault("failed_trial", failed.number)
        system["retry_history"] = history
        queued = self.study._storage.create_new_trial(  # Study.add_trial, with its id
            self.study_id, template_trial=optuna.trial.create_trial(
                state=TrialState.WAITING, params=failed.params,
                distributions=failed.distributions, system_attrs=system))
        self._queued_now.append(queued)
        return True

    # --- dead trials ------------------------------------------------------------------------

    def sweep(self) -> bool:
        """Fail (and queue again) other workers' dead trials, if the budget lock is free now;
        ``False`` when it was not (the next claim, or the next try, sweeps).

        The heartbeat thread calls this between beats, so it must never wait for the lock: a
        worker stopped or slow inside its claim would hold up every waiter's heartbeats, and
        the first of them to get the lock would then take every running trial for dead.
        """
        if not self.storage.get_heartbeat_interval():
            return True
        with budget_lock(self.storage, self.study.study_name, wait=False) as held:
            if held:
                self._sweep()
            return held

    def _sweep_due(self) -> bool:
        """At most one sweep per heartbeat interval per process when claiming.

        A dead trial cannot be told from a live one sooner than that, and a worker claiming in
        a tight loop (tiny models, many workers) would otherwise run the sweep's queries on
        every claim. The heartbeat thread sweeps every grace period as well.
        """
        interval = self.storage.get_heartbeat_interval()
        now = self.clock()
        if not interval or now - self._last_sweep < interval:
            return False
        self._last_sweep = now
        return True

    def _sweep(self) -> None:
        with self._sweep_lock:
            if not self._may_judge_others():
                return
            recovered = getattr(self.storage, "last_recovered", None)
            stale = self.storage._get_stale_trial_ids(self.study_id)
            if getattr(self.storage, "last_recovered", None) != recovered:
                # The query waited out an outage that began after the check above: it read
                # the heartbeats nobody could write meanwhile, so every trial looks dead.
                return
            for trial_id in stale:
                self._fail_dead(trial_id)
            now = self.clock()
            with self.storage.engine.connect() as conn:
                silent = optuna_sql.running_without_heartbeat(conn, self.study_id)
            # A trial whose process died between its creation and its first heartbeat. Timed
            # by this process's clock from when it first saw it: the trial's own start time
            # is the creating worker's local time, which says nothing in another time zone.
            self._silent_since = {i: self._silent_since.get(i, now) for i in silent}
            for trial_id, since in list(self._silent_since.items()):
                if now - since >= grace_period(self.storage):
                    self._fail_dead(trial_id)
                    del self._silent_since[trial_id]

    def _fail_dead(self, trial_id: int) -> None:
        try:
            if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                return
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # finished, or another worker was faster
        with self.storage.engine.begin() as conn:  # on a finished trial, Optuna's API refuses
            optuna_sql.set_trial_user_attrs(conn, trial_id, {attrs.FAIL_REASON: DEAD})
        self._requeue(self.storage.get_trial(trial_id), counts_as_retry=True)

    def _may_judge_others(self) -> bool:
        """False for a while after the database came back from an outage or a restart.

        During an outage nobody can beat; right after it every heartbeat looks old. Judging
        trials dead then would fail live ones, so the other workers first get a grace period
        (plus the longest retry pause) to beat again. A process that slept through a restart
        only sees it in the server's start time.
        """
        wait = (grace_period(self.storage) + retry_interval(10)
                + (self.storage.get_heartbeat_interval() or 0))
        recovered = getattr(self.storage, "last_recovered", None)
        if recovered is not None and time.monotonic() - recovered < wait:
            return False
        with self.storage.engine.connect() as conn:
            uptime = optuna_sql.server_uptime(conn)
        return uptime is None or uptime >= wait


def confirm_runs(conn: sqlalchemy.Connection, study_id: int) -> int:
    """How many runs a confirm step has queued: the budget grows by the runs that exist, so
    that a ``tuner confirm`` stopped halfway neither takes search slots nor leaves spare ones.
    A dead run's rerun replaces it and is not counted again."""
    return optuna_sql.count_trials_with(conn, study_id, attrs.CONFIRMS, without="failed_trial")


def remember_report(trial: optuna.Trial, step: int, value: float) -> None:
    """What ``Trial.report`` does once the value is written: the pruner reads a trial's
    intermediate values from the trial's own copy (``Trial.should_prune``, optuna 5)."""
    trial._cached_frozen_trial.intermediate_values[step] = value


def remember_attrs(trial: optuna.Trial, values: dict[str, Any],
                   system: dict[str, Any] | None = None) -> None:
    """What ``Trial.set_user_attr`` does once the values are written: the trial's own copy,
    which :meth:`Claimer.tell` returns, holds them too."""
    trial._cached_frozen_trial.user_attrs.update(values)
    trial._cached_frozen_trial.system_attrs.update(system or {})


def _is_sqlite(storage: RDBStorage) -> bool:
    return storage.engine.url.get_backend_name() == "sqlite"


def grace_period(storage: RDBStorage) -> float:
    """Seconds without a heartbeat after which a running trial is taken for dead."""
    interval = storage.get_heartbeat_interval() or 0
    return float(getattr(storage, "grace_period", None) or 2 * interval)


class _CreatedWithoutLock(Exception):
    """A claim's lock was lost after it created a trial or queued some again."""

    def __init__(self, trial_id: int | None, queued: list[int]) -> None:
        super().__init__(trial_id, queued)
        self.trial_id, self.queued = trial_id, queued


class LockLost(Exception):
    """A lock's database session ended while the lock was held (a server restart, an idle
    transaction timeout, a killed backend): what was done under it may have raced."""


def _release(conn: sqlalchemy.Connection) -> bool:
    """End the lock's transaction, which releases it; ``False`` if its session was gone."""
    try:
        conn.commit()
        return True
    except sa_exc.SQLAlchemyError:
        return False  # the server went away: the lock went with the session
    finally:
        conn.close()


def budget_lock(storage: RDBStorage, study_name: str, wait: bool = True, strict: bool = False
                ) -> contextlib.AbstractContextManager[bool]:
    """Hold the lock of the claim path: shared by every process that uses this study's
    database (see :func:`study_lock`)."""
    return study_lock(storage, study_name, "budget", wait, strict)


@contextlib.contextmanager
def study_lock(storage: RDBStorage, study_name: str, purpose: str,
               wait: bool = True, strict: bool = False) -> Iterator[bool]:
    """Hold a lock shared by every process that uses this study's database, one per
    ``purpose`` (the claim path's ``budget``; the dashboard figures' ``figures``), so that
    slow work under one never holds up the other. Yields whether it is held: always, unless
    ``wait`` is false and another process holds it. ``strict``: raise :class:`LockLost` on
    leaving if the lock's session ended meanwhile (PostgreSQL).

    PostgreSQL: a transaction-level advisory lock, so it also works behind PgBouncer in
    transaction mode and dies with its connection. SQLite: a file lock beside the database.
    """
    url = storage.engine.url
    if url.get_backend_name() == "postgresql":
        key = zlib.crc32(f"tuner-{purpose}:{study_name}".encode())
        take = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"

        def lock() -> tuple[sqlalchemy.Connection, bool]:
            conn = storage.engine.connect()
            try:
                got = conn.execute(sqlalchemy.text(f"SELECT {take}(:k)"), {"k": key}).scalar()
            except BaseException:
                conn.close()
                raise
            return conn, got is not False  # pg_advisory_xact_lock returns void

        conn, held = retry_on_disconnect(storage, lock)
        try:
            yield held
        except BaseException:
            _release(conn)
            raise
        if not _release(conn) and held and strict:
            raise LockLost(f"the {purpose} lock of study {study_name!r} was lost while held "
                           "(its database session ended)")
    elif url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        suffix = "" if purpose == "budget" else f".{purpose}"
        with open(f"{url.database}{suffix}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        yield True  # other databases are refused when the URL is read (settings.storage_url)
