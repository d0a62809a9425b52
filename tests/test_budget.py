"""The claim path (:mod:`tuner.budget`) against the real PostgreSQL: the rules as a table,
racing processes, a model-based test of claim / finish / die / give back / change the budget,
and the never-beat check under two time zones. No TensorFlow here."""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import optuna
import pytest
import sqlalchemy
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from optuna.trial import TrialState

from tuner import attrs, confirm
from tuner.budget import (
    MAX_RETRY,
    Budget,
    Claimed,
    Claimer,
    Decision,
    Usage,
    budget_lock,
    decide,
)
from tuner.storage import ResilientRDBStorage

INTERVAL, GRACE = 1, 2


class _Died(Exception):
    """A simulated worker process died at this point."""


class _Storage(ResilientRDBStorage):
    """The real storage, with a way to die between creating a trial and its first heartbeat."""

    die_before_heartbeat = False
    meanwhile: Callable[[], object] | None = None  # runs once the lock is lost, see below

    def _create_new_trial(self, study_id: int, template_trial: object = None) -> object:
        if self.meanwhile is not None:  # the server ends the lock's session (a restart, an
            with self.engine.begin() as conn:  # idle-transaction timeout, an admin)
                conn.execute(sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = "
                    "'advisory' AND granted AND pid <> pg_backend_pid()"))
            self.meanwhile, meanwhile = None, self.meanwhile
            meanwhile()
        return super()._create_new_trial(study_id, template_trial)

    def record_heartbeat(self, trial_id: int) -> None:
        if self.die_before_heartbeat:
            self.die_before_heartbeat = False
            raise _Died
        super().record_heartbeat(trial_id)


def _storage(url: str, grace: float = GRACE) -> _Storage:
    return _Storage(url, heartbeat_interval=INTERVAL, grace_period=grace,
                    engine_kwargs={"pool_size": 2, "max_overflow": 2})


def _new_study(storage: ResilientRDBStorage, n_trials: int | None,
               **budget: object) -> optuna.Study:
    study = optuna.create_study(study_name=f"s-{uuid.uuid4().hex[:10]}", storage=storage)
    study.set_user_attr(attrs.SPEC, {"n_trials": n_trials, **budget})
    return study


def _set_budget(study: optuna.Study, n_trials: int) -> None:
    study.set_user_attr(attrs.SPEC, {**study.user_attrs[attrs.SPEC], "n_trials": n_trials})


# --- the rules as a table -------------------------------------------------------------------


def _usage(complete: int = 0, pruned: int = 0, running: int = 0, waiting: int = 0,
           failed: int = 0, epochs: int = 0, confirm_waiting: int = 0,
           confirm_running: int = 0) -> Usage:
    return Usage(complete, pruned, running, waiting, failed, epochs, confirm_waiting,
                 confirm_running)


@pytest.mark.parametrize(("usage", "budget", "expected"), [
    (_usage(), Budget(6), Decision.CREATE),
    (_usage(complete=4, pruned=2), Budget(6), Decision.STOP),
    (_usage(complete=7), Budget(6), Decision.STOP),  # the budget was shrunk under the study
    # The hang this module exists to prevent: the dead trial's parameters wait in the queue.
    (_usage(complete=3, pruned=2, failed=1, waiting=1), Budget(6), Decision.TAKE),
    (_usage(complete=3, running=2, waiting=1), Budget(6), Decision.TAKE),
    (_usage(complete=3, running=3), Budget(6), Decision.WAIT),  # one of them may still die
    (_usage(complete=2, running=3, failed=5), Budget(6), Decision.CREATE),  # FAIL frees a slot
    # Queued beyond a shrunk budget: run only what fits.
    (_usage(complete=2, running=2, waiting=3), Budget(4), Decision.WAIT),
    (_usage(complete=2, running=1, waiting=3), Budget(4), Decision.TAKE),
    (_usage(complete=50, epochs=99), Budget(None, epochs=100), Decision.CREATE),
    (_usage(complete=50, epochs=100), Budget(None, epochs=100), Decision.STOP),
    (_usage(waiting=2, epochs=10), Budget(None, epochs=100), Decision.TAKE),
    (_usage(complete=1), Budget(None, seconds=60, clock_started=1000.0), Decision.CREATE),
    (_usage(complete=1, running=1), Budget(None, seconds=60, clock_started=900.0),
     Decision.STOP),
    (_usage(), Budget(None, seconds=60), Decision.CREATE),  # the clock starts at the first claim
    # Confirm runs queued after the epoch or time budget is spent still start; nothing else.
    (_usage(complete=4, waiting=1, confirm_waiting=1, epochs=130), Budget(None, epochs=100),
     Decision.TAKE),
    (_usage(complete=4, waiting=1, epochs=130), Budget(None, epochs=100), Decision.STOP),
    (_usage(complete=4, waiting=2, confirm_waiting=1),
     Budget(None, seconds=60, clock_started=900.0), Decision.TAKE),
    (_usage(complete=4, running=1, waiting=1, confirm_waiting=1),
     Budget(5, seconds=60, clock_started=900.0), Decision.WAIT),
    (_usage(complete=4, waiting=1), Budget(None, seconds=60, clock_started=900.0),
     Decision.STOP),
    # A confirm run still running after the budget is spent may die and be queued again:
    # someone waits to run it, or the confirm step would never finish.
    (_usage(complete=4, running=1, confirm_running=1, epochs=130), Budget(None, epochs=100),
     Decision.WAIT),
    (_usage(complete=4, running=1, confirm_running=1),
     Budget(None, seconds=60, clock_started=900.0), Decision.WAIT),
])
def test_decide(usage: Usage, budget: Budget, expected: Decision) -> None:
    assert decide(usage, budget, now=1000.0).decision is expected


def test_a_stop_says_which_budget_is_spent() -> None:
    assert decide(_usage(complete=6), Budget(6), 0).reason == "study budget of 6 trials is spent"
    assert decide(_usage(epochs=500), Budget(10, epochs=500), 0).reason == \
        "study budget of 500 epochs is spent"
    assert decide(_usage(), Budget(None, seconds=7200, clock_started=0), 7200).reason == \
        "study time budget of 2h is spent"
    # a study of one trial, as a quick check or a confirm run would have
    assert decide(_usage(complete=1), Budget(1), 0).reason == "study budget of 1 trial is spent"
    assert Budget(1).describe() == "1 trial" and Budget(1).progress(_usage()) == \
        "0 of 1 trial finished"


# --- processes racing for the last slots ------------------------------------------------------


def _claim_many(url: str, study_name: str, out: multiprocessing.Queue) -> None:
    storage = _storage(url)
    claimer = Claimer(optuna.load_study(study_name=study_name, storage=storage), storage)
    numbers = []
    while isinstance(claimed := claimer.claim(), Claimed):
        numbers.append(claimed.trial.number)
        claimer.study.tell(claimed.trial, 1.0)
    out.put(numbers)


def test_budget_is_exact_with_racing_processes(pg_url: str) -> None:
    """Six processes ask as fast as they can: exactly the budget is created, no overshoot."""
    name = _new_study(_storage(pg_url), 25).study_name
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_many, args=(pg_url, name, out)) for _ in range(6)]
    for p in procs:
        p.start()
    numbers = sorted(n for _ in procs for n in out.get(timeout=120))
    for p in procs:
        p.join(timeout=60)
    assert numbers == list(range(25))
    states = [t.state.name for t in optuna.load_study(study_name=name, storage=pg_url).trials]
    assert states == ["COMPLETE"] * 25


# --- retries: crashes are capped, interrupts are not ----------------------------------------


def _age_heartbeat(storage: ResilientRDBStorage, trial_id: int) -> None:
    """Make a trial's heartbeat an hour old: its worker died that long ago."""
    with storage.engine.begin() as conn:
        conn.execute(sqlalchemy.text(
            "UPDATE trial_heartbeats SET heartbeat = heartbeat - INTERVAL '1 hour' "
            "WHERE trial_id = :t"), {"t": trial_id})


def test_interrupts_never_use_up_the_crash_retries(pg_url: str) -> None:
    storage = _storage(pg_url)
    study = _new_study(storage, 1)
    claimer = Claimer(study, storage)
    for _ in range(MAX_RETRY + 3):  # given back more often than a crash would be retried
        claimed = claimer.claim()
        claimed.trial.suggest_float("x", 0, 1)
        claimer.give_back(claimed.trial)
    params = {t.params["x"] for t in study.trials if t.state == TrialState.FAIL}
    assert len(params) == 1  # the same parameters each time
    deaths = 0
    while True:  # now its worker keeps dying: retried MAX_RETRY times, then dropped
        claimed = claimer.claim()
        if claimed.trial.params.get("x") not in params:
            break
        deaths += 1
        _age_heartbeat(storage, claimed.trial_id)
        claimer.sweep()
    assert deaths == MAX_RETRY + 1  # the first run and its retries
    reasons = [t.user_attrs.get(attrs.FAIL_REASON) for t in study.trials
               if t.state == TrialState.FAIL]
    assert reasons.count(attrs.INTERRUPTED) == MAX_RETRY + 3


# --- finishing a trial -------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "state", "stored_state", "stored_value"), [
    (0.25, TrialState.COMPLETE, TrialState.COMPLETE, 0.25),
    (None, TrialState.PRUNED, TrialState.PRUNED, 0.75),  # the last epoch's value
    (float("nan"), TrialState.COMPLETE, TrialState.FAIL, None),
    (None, TrialState.FAIL, TrialState.FAIL, None),
])
def test_tell_returns_what_the_database_now_holds(
        pg_url: str, value: float | None, state: TrialState, stored_state: TrialState,
        stored_value: float | None) -> None:
    storage = _storage(pg_url)
    study = _new_study(storage, 2)
    claimer = Claimer(study, storage)
    trial = claimer.claim().trial
    trial.suggest_float("x", 0, 1)
    trial.report(0.5, 1)
    trial.report(0.75, 2)
    trial.set_user_attr("note", "kept")
    told = claimer.tell(trial, value, state)
    stored = storage.get_trial(trial._trial_id)
    assert (told.state, told.value) == (stored.state, stored.value) \
        == (stored_state, stored_value)
    for field in ("number", "params", "distributions", "intermediate_values", "user_attrs"):
        assert getattr(told, field) == getattr(stored, field), field
    assert claimer.claim().trial.number == 1  # the budget saw it finish


def test_tell_refuses_a_trial_another_worker_judged_dead(pg_url: str) -> None:
    storage = _storage(pg_url)
    study = _new_study(storage, 2)
    mine = Claimer(study, storage).claim()
    mine.trial.suggest_float("x", 0, 1)
    other = Claimer(optuna.load_study(study_name=study.study_name, storage=storage), storage)
    _age_heartbeat(storage, mine.trial_id)
    other.sweep()
    assert storage.get_trial(mine.trial_id).state == TrialState.FAIL
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        Claimer(study, storage).tell(mine.trial, 0.1)
    assert storage.get_trial(mine.trial_id).state == TrialState.FAIL


def test_heartbeats_go_on_while_another_process_holds_the_budget_lock(any_url: str) -> None:
    """The heartbeat thread sweeps too, but never waits for the lock to do it: a claim held up
    for longer than the grace period (a stopped process, a slow confirm) must not stop the
    running trials' heartbeats, or the first sweep after it fails every one of them."""
    from tuner.worker import _Heartbeat

    storage = _storage(any_url)
    study = _new_study(storage, 2)
    mine = Claimer(study, storage)
    claimed = mine.claim()
    with _Heartbeat(storage, claimed, mine.sweep):
        with budget_lock(_storage(any_url), study.study_name):  # another process's claim
            until = time.monotonic() + 2.5 * GRACE
            while time.monotonic() < until:
                assert storage._get_stale_trial_ids(study._study_id) == []
                time.sleep(0.25)
        assert Claimer(study, storage).sweep()  # the lock is free again: a sweep finds
    assert storage.get_trial(claimed.trial_id).state == TrialState.RUNNING  # nothing dead


def test_a_sweep_never_waits_for_the_budget_lock(any_url: str) -> None:
    storage = _storage(any_url)
    study = _new_study(storage, 2)
    with budget_lock(_storage(any_url), study.study_name):
        started = time.monotonic()
        assert Claimer(study, storage).sweep() is False
        assert time.monotonic() - started < 1
    assert Claimer(study, storage).sweep() is True


def test_a_tell_and_a_sweep_never_both_win(any_url: str) -> None:
    """A worker that stalled past the grace period tells its result while another worker's
    sweep fails the trial: exactly one of them wins, on SQLite too (which ignores the row
    locks Optuna relies on). Both winning would run the configuration twice."""
    import threading

    storage, judge_storage = _storage(any_url), _storage(any_url)
    study = _new_study(storage, None)
    judge = Claimer(optuna.load_study(study_name=study.study_name, storage=judge_storage),
                    judge_storage)

    def stalled() -> Claimed:
        claimed = Claimer(study, storage).claim()
        claimed.trial.suggest_float("x", 0, 1)
        with storage.engine.begin() as conn:  # its worker stalled: the heartbeat is old
            conn.execute(sqlalchemy.text(
                "UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00' "
                "WHERE trial_id = :t"), {"t": claimed.trial_id})
        return claimed

    def requeued_for(claimed: Claimed) -> list[optuna.trial.FrozenTrial]:
        return [t for t in study.get_trials(deepcopy=False)
                if t.system_attrs.get("failed_trial") == claimed.trial.number]

    # each order on its own: the sweep first, then the tell (the sweep wins) ...
    claimed = stalled()
    judge.sweep()
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        Claimer(study, storage).tell(claimed.trial, 0.5)
    assert storage.get_trial(claimed.trial_id).state == TrialState.FAIL
    assert len(requeued_for(claimed)) == 1
    Claimer(study, storage).claim()  # take the rerun
    study.tell(requeued_for(claimed)[0].number, 0.5)
    # ... and the tell first, then the sweep (the tell wins)
    claimed = stalled()
    Claimer(study, storage).tell(claimed.trial, 0.5)
    judge.sweep()
    assert storage.get_trial(claimed.trial_id).state == TrialState.COMPLETE
    assert not requeued_for(claimed)
    # then both at once, many times
    for _ in range(25):
        claimed = stalled()
        told: list[bool] = []
        start = threading.Barrier(2)

        def tell(claimed: Claimed = claimed, start: threading.Barrier = start,
                 told: list[bool] = told) -> None:
            start.wait()
            try:
                Claimer(study, storage).tell(claimed.trial, 0.5)
                told.append(True)
            except optuna.exceptions.UpdateFinishedTrialError:
                told.append(False)

        teller = threading.Thread(target=tell)
        teller.start()
        start.wait()
        judge.sweep()
        teller.join()
        state = storage.get_trial(claimed.trial_id).state
        requeued = requeued_for(claimed)
        if told[0]:
            assert state == TrialState.COMPLETE and not requeued
        else:
            assert state == TrialState.FAIL and len(requeued) == 1
            Claimer(study, storage).claim()  # take the rerun, so the next round starts clean
            study.tell(requeued[0].number, 0.5)


def test_a_trial_created_after_the_lock_was_lost_is_not_run(pg_url: str) -> None:
    """Two workers at the last slot: one's lock session ends while it creates the trial, the
    other claims meanwhile. The first must notice, drop what it created and decide again,
    or the study runs one trial over its budget."""
    storage = _storage(pg_url)
    study = _new_study(storage, 1)
    other_storage = _storage(pg_url)
    other = Claimer(optuna.load_study(study_name=study.study_name, storage=other_storage),
                    other_storage)
    storage.meanwhile = other.claim  # takes the lock the moment it is free

    def gives_up(seconds: float) -> None:
        raise _Died  # waiting, as it should: the only slot is the other worker's

    with pytest.raises(_Died):
        Claimer(study, storage).claim(wait=gives_up)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL]
    assert trials[1].user_attrs[attrs.FAIL_REASON].startswith("created after its worker lost")


@pytest.mark.parametrize("meanwhile", [TrialState.COMPLETE, TrialState.FAIL])
def test_a_state_change_retried_after_a_dropped_connection(
        pg_url: str, meanwhile: TrialState, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection drops as a worker tells COMPLETE; on the retry the trial is already
    finished. If it was this write that committed, the tell succeeded; if another worker's
    sweep failed the trial meanwhile, the worker must hear so, not believe it completed."""
    from optuna.storages import RDBStorage
    from sqlalchemy import exc as sa_exc

    storage = _storage(pg_url)
    trial_id = _new_study(storage, 2).ask()._trial_id
    write = RDBStorage.set_trial_state_values
    dropped: list[bool] = []

    def drops_once(self: RDBStorage, trial_id: int, state: TrialState,
                   values: list[float] | None = None) -> bool:
        if not dropped:
            dropped.append(True)
            write(self, trial_id, meanwhile, [0.5] if meanwhile == TrialState.COMPLETE
                  else None)  # committed, by this try or by another worker's sweep
            raise sa_exc.OperationalError("COMMIT", {}, Exception(
                "server closed the connection unexpectedly"))
        return write(self, trial_id, state, values)

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", drops_once)
    if meanwhile == TrialState.COMPLETE:
        assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
    else:
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
    assert dropped and storage.get_trial(trial_id).state == meanwhile


def test_a_trial_queued_again_after_the_lock_was_lost_does_not_outlive_the_budget(
        pg_url: str) -> None:
    """A claim's sweep queues a dead trial's parameters again as the server ends its lock
    session; another worker, seeing no queued trial yet, creates one for the only slot. The
    queued trial would wait for ever past the budget: it is failed instead (found by the
    model below)."""
    storage = _storage(pg_url)
    study = _new_study(storage, 1)
    dead = Claimer(study, storage).claim()
    _age_heartbeat(storage, dead.trial_id)
    other_storage = _storage(pg_url)
    other = Claimer(optuna.load_study(study_name=study.study_name, storage=other_storage),
                    other_storage)
    storage.meanwhile = other.claim  # runs as the sweep queues the dead trial again

    def gives_up(seconds: float) -> None:
        raise _Died

    with pytest.raises(_Died):
        Claimer(study, storage).claim(wait=gives_up)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.RUNNING) == 1 and TrialState.WAITING not in states, states


# --- the never-beat check does not read the worker's local clock --------------------------------


@contextmanager
def _time_zone(name: str) -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.parametrize(("creator", "judge"), [("Europe/Berlin", "America/New_York"),
                                                ("America/New_York", "Europe/Berlin")])
def test_a_trial_that_never_beat_is_failed_after_the_grace_period_in_any_time_zone(
        pg_url: str, creator: str, judge: str) -> None:
    storage = _storage(pg_url)
    study = _new_study(storage, 2)
    with _time_zone(creator):
        storage.die_before_heartbeat = True
        with pytest.raises(_Died):
            Claimer(study, storage).claim_once()  # created, then its process died
    with _time_zone(judge):
        other = Claimer(optuna.load_study(study_name=study.study_name, storage=storage),
                        storage)
        started = time.monotonic()
        while study.trials[0].state == TrialState.RUNNING:
            other.sweep()
            assert time.monotonic() - started < GRACE + 5, "never failed"
            time.sleep(0.2)
        waited = time.monotonic() - started
    assert waited >= GRACE - 0.1  # not failed early: it had no chance to beat yet
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[1].state == TrialState.WAITING  # queued to run again


# --- a changed budget holds for workers that are already claiming ---------------------------------


def test_budget_shrunk_and_raised_under_running_workers(pg_url: str) -> None:
    storage = _storage(pg_url)
    study = _new_study(storage, 6)
    a, b = (Claimer(optuna.load_study(study_name=study.study_name, storage=storage), storage)
            for _ in range(2))
    first = a.claim()
    a.study.tell(first.trial, 1.0)
    held = b.claim()
    _set_budget(study, 2)  # shrunk: one finished, one running = the whole budget
    assert a.claim_once()[0].decision is Decision.WAIT
    b.study.tell(held.trial, 1.0)
    assert a.claim_once()[0].decision is Decision.STOP
    _set_budget(study, 3)  # raised: one more
    verdict, trial_id = a.claim_once()
    assert verdict.decision is Decision.CREATE and trial_id is not None


# --- the model-based test ----------------------------------------------------------------------

WORKERS = 3
# The model's dead workers are dead by decree (their heartbeat is aged an hour), and its clock
# is simulated; a real grace period this long keeps a live simulated worker from being judged
# dead because the machine stalled for a few real seconds between two of its beats.
MODEL_GRACE = 60


class ClaimPath(RuleBasedStateMachine):
    """Simulated workers drive the real claim path; the study must always be able to finish.

    A worker is idle, or holds a trial. It may claim, complete, prune or fail its trial, give it
    back, die (its heartbeat goes stale and it starts again idle) or die between creating a
    trial and its first heartbeat; the budget may change; time may pass; the study's time
    budget may run out (then only confirm runs start); a confirm step may queue runs of the
    best configurations, once. Sweeps judge the dead.
    """

    url: str

    def __init__(self) -> None:
        super().__init__()
        self.storage = _storage(self.url, grace=MODEL_GRACE)
        self.now = 1000.0
        self.held: dict[int, tuple[optuna.Trial, int]] = {}
        self.dead: set[int] = set()  # trial ids abandoned by dead workers
        self.shrunk = False
        self.confirmed = False
        self.out_of_time = False
        self.claimers: list[Claimer] = []
        self.steps = 0

    def clock(self) -> float:
        return self.now

    @initialize(n_trials=st.integers(1, 8))
    def start(self, n_trials: int) -> None:
        self.n_trials = self.allowed = n_trials
        self.study = _new_study(self.storage, n_trials)
        self.claimers = [
            Claimer(optuna.load_study(study_name=self.study.study_name, storage=self.storage),
                    self.storage, clock=self.clock) for _ in range(WORKERS)]

    def usage(self) -> Usage:
        return self.claimers[0].state()[0]

    def beat(self) -> None:
        """The heartbeat threads of the live workers."""
        for _, trial_id in self.held.values():
            self.storage.record_heartbeat(trial_id)

    # --- rules ---

    @rule(w=st.integers(0, WORKERS - 1))
    def claim(self, w: int) -> None:
        if w in self.held:
            return
        self.beat()
        verdict, trial_id = self.claimers[w].claim_once()
        self.steps += 1
        usage = self.usage()
        if verdict.decision is Decision.WAIT:
            # never wait while a queued trial could run: a confirm run within the budget, or
            # any within the search's own part of it (none once out of time)
            room = usage.finished + usage.running < self.n_trials
            search_part = self.n_trials - (self.runs if self.confirmed else 0)
            searching = (usage.finished - usage.confirm_finished + usage.running
                         - usage.confirm_running)
            search_room = not self.out_of_time and searching < search_part
            assert not (usage.confirm_waiting and room), usage
            assert not (usage.waiting and room and search_room), usage
        if trial_id is not None:
            self.held[w] = (self.claimers[w]._trial(trial_id), trial_id)
            self.held[w][0].suggest_float("x", 0.0, 1.0)
        else:
            assert verdict.decision in (Decision.STOP, Decision.WAIT)

    @rule(w=st.integers(0, WORKERS - 1),
          end=st.sampled_from(["complete", "prune", "fail", "give back"]))
    def finish(self, w: int, end: str) -> None:
        if w not in self.held:
            return
        trial, _ = self.held.pop(w)
        claimer = self.claimers[w]
        if end == "complete":
            claimer.tell(trial, trial.params["x"])
        elif end == "prune":
            claimer.tell(trial, state=TrialState.PRUNED)
        elif end == "fail":
            claimer.tell(trial, state=TrialState.FAIL)
        else:
            claimer.give_back(trial)

    @rule(w=st.integers(0, WORKERS - 1))
    def die(self, w: int) -> None:
        if w not in self.held:
            return
        _, trial_id = self.held.pop(w)
        _age_heartbeat(self.storage, trial_id)
        self.dead.add(trial_id)
        self.claimers[w] = Claimer(self.claimers[w].study, self.storage, clock=self.clock)

    @rule(w=st.integers(0, WORKERS - 1))
    def die_before_first_heartbeat(self, w: int) -> None:
        if w in self.held:
            return
        self.beat()
        self.storage.die_before_heartbeat = True
        try:
            self.claimers[w].claim_once()
        except _Died:
            pass
        finally:
            self.storage.die_before_heartbeat = False
        self.claimers[w] = Claimer(self.claimers[w].study, self.storage, clock=self.clock)

    @rule(n_trials=st.integers(1, 10))
    def change_budget(self, n_trials: int) -> None:
        usage = self.usage()
        _set_budget(self.study, n_trials)
        if self.confirmed:  # the confirm runs come on top of what the search had spent
            n_trials = max(n_trials, self.searched) + self.runs
        self.shrunk |= n_trials < self.n_trials
        self.n_trials = n_trials
        self.allowed = max(n_trials, usage.finished + usage.running)

    @rule(top=st.integers(1, 3), seeds=st.integers(1, 2))
    def confirm(self, top: int, seeds: int) -> None:
        """`tuner confirm`: its runs are queued and the budget grows by them, even where the
        search has spent its budget or had it lowered below what it ran."""
        usage = self.usage()
        if self.confirmed or not usage.complete:
            return
        queued = confirm.queue(self.study, self.storage, top, seeds)
        # what the search spent, and its running trials: they count once they finish
        self.confirmed, self.searched = True, usage.finished + usage.running
        self.runs = queued.added
        assert queued.added == queued.trials == seeds * len(queued.configs)
        self.n_trials = max(self.n_trials, self.searched) + self.runs
        self.allowed = max(self.allowed, self.n_trials)
        assert self.claimers[0].state()[1].n_trials == self.n_trials
        assert self.usage().waiting == usage.waiting + queued.added

    @rule(seconds=st.floats(0.1, 3.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: self.claimers and not self.out_of_time)
    @rule()
    def time_budget_runs_out(self) -> None:
        """The study's hours are spent: no new search trial starts, confirm runs still do."""
        self.study.set_user_attr(attrs.SPEC, {**self.study.user_attrs[attrs.SPEC],
                                              "time_budget": 60})
        self.study.set_user_attr(attrs.CLOCK_STARTED, time.time() - 3600)
        self.out_of_time = True

    @precondition(lambda self: self.claimers)
    @rule(w=st.integers(0, WORKERS - 1))
    def sweep_after_the_grace_period(self, w: int) -> None:
        """Once a grace period has passed, every dead trial is failed and queued again."""
        self.beat()
        self.claimers[w].sweep()  # sees trials that never beat
        self.now += MODEL_GRACE + INTERVAL  # a little past it: sums of floats round
        self.claimers[w].sweep()
        states = {t._trial_id: t for t in self.study.get_trials(deepcopy=False)}
        for trial_id in self.dead:
            assert states[trial_id].state == TrialState.FAIL
        held = {trial_id for _, trial_id in self.held.values()}
        running = {i for i, t in states.items() if t.state == TrialState.RUNNING}
        assert running <= held, "a dead trial is still RUNNING after the grace period"
        self.dead.clear()

    # --- invariants ---

    @invariant()
    def never_past_the_budget(self) -> None:
        if self.claimers:
            assert self.usage().finished <= self.allowed

    @invariant()
    def never_more_running_than_the_budget_allows(self) -> None:
        if self.claimers:
            usage = self.usage()
            assert usage.finished + usage.running <= max(self.allowed, self.n_trials), usage

    @invariant()
    def retries_are_capped(self) -> None:
        if self.claimers:
            for t in self.study.get_trials(deepcopy=False):
                assert len(t.system_attrs.get("retry_history", [])) <= MAX_RETRY

    def teardown(self) -> None:
        """Workers that keep claiming and completing finish the study, exactly."""
        try:
            if self.claimers:
                self._finish_the_study()
        finally:
            self.storage.engine.dispose()

    def _finish_the_study(self) -> None:
        stopped: set[int] = set()
        for _ in range(60 * WORKERS):
            self.beat()
            for w in range(WORKERS):
                if w in self.held:
                    trial, _ = self.held.pop(w)
                    self.claimers[w].tell(trial, 0.5)
                elif w not in stopped:
                    verdict, trial_id = self.claimers[w].claim_once()
                    if verdict.decision is Decision.STOP:
                        stopped.add(w)
                    elif trial_id is not None:
                        self.held[w] = (self.claimers[w]._trial(trial_id), trial_id)
            if len(stopped) == WORKERS:
                break
            self.now += MODEL_GRACE + INTERVAL  # let dead trials be judged
        else:
            pytest.fail(f"the study never finished: {self.usage()}")
        usage = self.usage()
        assert usage.finished <= self.allowed
        if self.out_of_time:
            # The search stopped early, and a dead search trial may be left RUNNING (nobody
            # needs it run again); a confirm run must not be: nobody stopped while one could
            # still die, and a dead one was run again.
            assert usage.confirm_running == usage.confirm_waiting == 0, usage
            return
        assert self.n_trials <= usage.finished
        if not self.shrunk:
            assert usage.finished == self.n_trials
            assert usage.running == 0 and usage.waiting == 0, usage
        if self.confirmed:  # no confirm run is left behind, whatever the budget went through
            left = [t.number for t in self.study.get_trials(deepcopy=False)
                    if attrs.CONFIRMS in t.system_attrs and not t.state.is_finished()]
            assert not left, f"confirm runs {left} never ran: {usage}"


def test_claim_path_model(pg_url: str) -> None:
    ClaimPath.url = pg_url
    started = time.monotonic()
    run_state_machine_as_test(ClaimPath, settings=settings(
        max_examples=int(os.environ.get("TUNER_MODEL_EXAMPLES", "25")),
        stateful_step_count=30, deadline=None, derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    print(f"\n[claim path model] {time.monotonic() - started:.0f}s")


def test_confirm_runs_come_on_top_of_a_search_that_overspent_a_lowered_budget() -> None:
    """n_trials lowered to 2 after 3 trials finished, then 3 confirm runs queued: all three
    run. Counted from n_trials alone, the budget (5) would be spent with one still queued."""
    spec = {"n_trials": 2, "epoch_budget": 20, "model": {"epochs": 4}}
    request = {"searched": 3, "searched_epochs": 24}
    budget = Budget.from_spec(spec, confirm_runs=3, confirm=request)
    assert (budget.n_trials, budget.epochs) == (6, 24 + 3 * 4)
    for done in range(3):  # the runs finish one by one, 4 epochs each
        usage = Usage(complete=3 + done, waiting=3 - done, epochs=24 + 4 * done,
                      confirm_waiting=3 - done, confirm_epochs=4 * done)
        assert decide(usage, budget, time.time()).decision is Decision.TAKE
    done = Usage(complete=6, epochs=36, confirm_epochs=12)
    assert decide(done, budget, time.time()).decision is Decision.STOP
    # a budget above what the search spent is grown from the budget, as before
    assert Budget.from_spec({"n_trials": 8}, confirm_runs=3, confirm=request).n_trials == 11


def test_confirm_runs_that_stop_early_leave_no_epochs_to_the_search() -> None:
    """The epoch budget grows by each confirm run's most epochs; runs that early-stop use
    fewer, and the rest must not start new search trials after the confirm step (one of them
    could then win, unconfirmed)."""
    spec = {"epoch_budget": 30, "model": {"epochs": 30}}
    budget = Budget.from_spec(spec, confirm_runs=2, confirm={"searched": 6,
                                                             "searched_epochs": 31})
    assert (budget.epochs, budget.search_epochs) == (31 + 60, 31)
    confirmed = Usage(complete=8, epochs=31 + 10, confirm_epochs=10)  # 5 epochs each
    verdict = decide(confirmed, budget, time.time())
    assert verdict.decision is Decision.STOP
    assert verdict.reason == "study budget of 31 epochs is spent"  # the search's, not 91
    # asked for mid-search, the runs come on top: the search still has its own epochs left
    early = Budget.from_spec(spec, confirm_runs=2, confirm={"searched": 2,
                                                            "searched_epochs": 12})
    usage = Usage(complete=4, epochs=12 + 10, confirm_epochs=10)
    assert decide(usage, early, time.time()).decision is Decision.CREATE
    usage = Usage(complete=9, epochs=30 + 10, confirm_epochs=10)
    assert decide(usage, early, time.time()).decision is Decision.STOP
