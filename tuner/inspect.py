"""The facts behind the read-only verbs: ``status``, ``trials``, ``importance``, ``best``.

Each function returns data (dataclasses and JSON-ready dicts with stable keys);
:mod:`tuner.render` words them. ``status`` must answer at once even for a study of tens of
thousands of trials, so it never loads trials: a handful of SQL queries per study
(:mod:`tuner.optuna_sql`). No TensorFlow is imported anywhere here.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from tuner import attrs, confirm, optuna_sql, render
from tuner import study as studies
from tuner.budget import Budget, Usage, confirm_runs
from tuner.errors import RuntimeFailure, UserError
from tuner.figures import turned_up_at
from tuner.spec import StudySpec
from tuner.storage import unreachable
from tuner.urls import mask

_STATE_NAMES = {"running": "RUNNING", "complete": "COMPLETE", "pruned": "PRUNED",
                "failed": "FAIL", "waiting": "WAITING"}
EDGE_FRACTION = 0.05


# ---------------------------------------------------------------------------- status


@dataclass(frozen=True)
class RunningTrial:
    """A trial being trained right now, as ``status`` shows it."""

    trial: int
    host: str | None
    gpu: str | None
    epoch: int | None
    max_epochs: int | None
    running_s: float | None
    heartbeat_age_s: float | None
    last_epoch_age_s: float | None = None  # a trial whose epochs stop coming may be hung


@dataclass(frozen=True)
class StudyStatus:
    """One study at a glance: the shape ``tuner status --json`` prints per study."""

    study: str
    states: dict[str, int]
    n_trials: int | None
    left: int | None
    best_trial: int | None
    best_value: float | None
    best_found_at: str | None
    running: list[RunningTrial] = field(default_factory=list)
    epoch_budget: int | None = None
    epochs: int | None = None  # epochs trained so far (counted when there is an epoch budget)
    time_budget: float | None = None  # seconds
    budget: str = ""  # the budget and what is spent of it, in words


def study_status(engine: sqlalchemy.Engine, study_id: int, name: str) -> StudyStatus:
    """Counts, best so far and running trials of one study, in a few SQL queries."""
    with engine.connect() as conn:
        counts = optuna_sql.count_states(conn, study_id)
        states = {key: counts.get(db, 0) for key, db in _STATE_NAMES.items()}
        spec = optuna_sql.study_attr(conn, study_id, attrs.SPEC)
        spec = spec if isinstance(spec, dict) else {}
        found = optuna_sql.study_attrs(conn, study_id, (attrs.CLOCK_STARTED, attrs.CONFIRM))
        budget = Budget.from_spec(spec, found.get(attrs.CLOCK_STARTED),
                                  confirm_runs(conn, study_id) if attrs.CONFIRM in found else 0,
                                  found.get(attrs.CONFIRM))
        epochs = (optuna_sql.epochs_reported(conn, study_id)
                  if budget.epochs is not None else None)
        best = optuna_sql.best_trial(conn, study_id) if states["complete"] else None
        found_at = None if best is None else _found_at(conn, best)
        running = _running(conn, study_id, spec) if states["running"] else []
    n_trials = budget.n_trials
    usage = Usage.from_counts(counts, epochs or 0)
    left = None if n_trials is None else max(0, n_trials - usage.finished)
    return StudyStatus(
        study=name, states=states, n_trials=n_trials, left=left,
        best_trial=best["number"] if best else None,
        best_value=best["value"] if best else None,
        best_found_at=found_at,
        running=running,
        epoch_budget=budget.epochs, epochs=epochs, time_budget=budget.seconds,
        budget=f"{budget.describe()}: {budget.progress(usage)}" if spec else "",
    )


def all_status(engine: sqlalchemy.Engine, name: str | None = None) -> list[StudyStatus]:
    """Status of every study in the database (or of ``name``: unknown is a user error)."""
    try:
        with engine.connect() as conn:
            found = optuna_sql.studies(conn, name)
            known = [n for _, n in optuna_sql.studies(conn)] if name and not found else []
    except sqlalchemy.exc.DBAPIError as exc:  # unreachable, not a database, no tables yet
        if not optuna_sql.is_missing_table(exc):
            raise unreachable(engine.url.render_as_string(hide_password=False), exc) from None
        found, known = [], []  # a database nothing has run in yet: no Optuna tables
    if name is not None and not found:
        raise UserError(studies.unknown_study_message(
            name, known, mask(engine.url.render_as_string(hide_password=False))))
    return [study_status(engine, sid, sname) for sid, sname in found]


def _running(conn: sqlalchemy.Connection, study_id: int, spec: Any) -> list[RunningTrial]:
    """Running trials with host, GPU, last finished epoch and its age, and heartbeat age.

    Times come from the trial's ``started_at`` (UTC seconds) and its curve's epoch times, so a
    worker's time zone never shows; heartbeat ages use the database's clock, which writes them.
    """
    keys = (attrs.HOST, attrs.GPU, attrs.STARTED_AT, attrs.CURVE)
    now = dt.datetime.now(dt.UTC).timestamp()
    max_epochs = spec.get("model", {}).get("epochs") if isinstance(spec, dict) else None
    running = []
    for row in optuna_sql.running_trials(conn, study_id, keys):
        started = row.get(attrs.STARTED_AT)
        times = (row.get(attrs.CURVE) or {}).get("t") or []
        running.append(RunningTrial(
            trial=row["number"], host=row.get(attrs.HOST), gpu=row.get(attrs.GPU),
            epoch=len(times) or row["step"], max_epochs=max_epochs,
            running_s=None if started is None else round(max(0.0, now - started), 1),
            last_epoch_age_s=(None if started is None or not times
                              else round(max(0.0, now - started - times[-1]), 1)),
            heartbeat_age_s=(None if row["heartbeat_age"] is None
                             else round(row["heartbeat_age"], 1)),
        ))
    return running


def _found_at(conn: sqlalchemy.Connection, best: dict[str, Any]) -> str | None:
    """When the best trial completed, in UTC: its ``started_at`` plus its ``seconds``.

    Optuna's own ``datetime_complete`` is the worker's local time without a zone, which means
    nothing on a machine in another zone; it is used only for trials without those attributes.
    """
    found = optuna_sql.trial_attrs(conn, best["trial_id"], (attrs.STARTED_AT, attrs.SECONDS))
    if attrs.STARTED_AT in found and attrs.SECONDS in found:
        at = dt.datetime.fromtimestamp(found[attrs.STARTED_AT] + found[attrs.SECONDS], dt.UTC)
        return at.isoformat()
    complete = best["datetime_complete"]
    return None if complete is None else complete.replace(tzinfo=dt.UTC).isoformat()


# ---------------------------------------------------------------------------- trials


def trial_rows(study: optuna.Study, spec: StudySpec) -> list[dict[str, Any]]:
    """One dict per trial with stable keys: number, state, every parameter, then results.

    ``val_loss`` is the objective; for a pruned trial it is its best reported epoch, the same
    epoch its ``val_accuracy`` and ``gap`` describe.
    """
    from tuner.space import param_names

    trials = study.get_trials(deepcopy=False)
    names = param_names(spec)
    names += sorted({p for t in trials for p in t.params} - set(names))
    return [_trial_row(t, names) for t in trials]


def _trial_row(t: FrozenTrial, names: list[str]) -> dict[str, Any]:
    a = t.user_attrs
    val_loss = t.value
    if t.state == TrialState.PRUNED and t.intermediate_values:
        finite = [v for v in t.intermediate_values.values() if math.isfinite(v)]
        val_loss = min(finite) if finite else None
    started, ended = _trial_times(t)
    row: dict[str, Any] = {"number": t.number, "state": t.state.name}
    row.update({name: t.params.get(name) for name in names})
    row.update({
        "val_loss": val_loss,
        "val_accuracy": a.get(attrs.VAL_ACCURACY),
        "train_loss": a.get(attrs.TRAIN_LOSS),
        "gap": a.get(attrs.GAP),
        "test_loss": a.get(attrs.TEST_LOSS),
        "test_accuracy": a.get(attrs.TEST_ACCURACY),
        "best_epoch": a.get(attrs.BEST_EPOCH),
        "epochs_run": a.get(attrs.EPOCHS_RUN),
        "pruned_at": a.get(attrs.PRUNED_AT),
        "confirms": t.system_attrs.get(attrs.CONFIRMS),
        "host": a.get(attrs.HOST),
        "started_at": started,
        "ended_at": ended,
        "seconds": a.get(attrs.SECONDS),
        "fail_reason": a.get(attrs.FAIL_REASON),
    })
    return {k: _finite(v) for k, v in row.items()}


def _trial_times(t: FrozenTrial) -> tuple[str | None, str | None]:
    """Start and end in UTC (ISO 8601), from the trial's own ``started_at``.

    Optuna's ``datetime_start``/``datetime_complete`` are the worker's local time without a
    zone; only their difference is used, which is the same in every zone.
    """
    started = t.user_attrs.get(attrs.STARTED_AT)
    if started is None:
        return None, None
    start = dt.datetime.fromtimestamp(started, dt.UTC)
    end = None
    if t.datetime_start is not None and t.datetime_complete is not None:
        end = start + (t.datetime_complete - t.datetime_start)
    return _iso(start), None if end is None else _iso(end)


def _iso(value: dt.datetime) -> str:
    return value.isoformat(timespec="seconds")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------- importance


@dataclass(frozen=True)
class RangePosition:
    """Where the best trial's value of one parameter sits in its search range."""

    param: str
    key: str
    value: float
    low: float
    high: float
    log: bool
    position: float
    pinned: str | None
    advice: str | None


def importances(study: optuna.Study) -> tuple[dict[str, float] | None, str | None]:
    """Optuna's parameter importances (default evaluator), or ``None`` and why not."""
    complete = _n_complete(study)
    if complete < 2:
        return None, (f"importances need at least 2 completed trials; study "
                      f"{study.study_name!r} has {complete}")
    try:
        return dict(optuna.importance.get_param_importances(study)), None
    except (ValueError, RuntimeError) as exc:
        return None, f"importances not available yet ({exc})"


def _n_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def range_positions(trial: FrozenTrial) -> list[RangePosition]:
    """For each searched parameter of ``trial``: its place in the range, edge advice."""
    out = []
    for name, dist in trial.distributions.items():
        low, high = getattr(dist, "low", None), getattr(dist, "high", None)
        value = trial.params[name]
        if low is None or high is None or high <= low or not isinstance(value, int | float):
            continue
        log = bool(getattr(dist, "log", False))
        if log:
            position = (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
        else:
            position = (value - low) / (high - low)
        position = min(1.0, max(0.0, position))
        pinned = "low" if position <= EDGE_FRACTION else \
            "high" if position >= 1 - EDGE_FRACTION else None
        key = _search_key(name)
        out.append(RangePosition(name, key, float(value), float(low), float(high), log,
                                 round(position, 4), pinned, _advice(name, key, pinned, low,
                                                                     high)))
    return out


def _search_key(param: str) -> str:
    """The study-file key that holds ``param``'s range."""
    if param.startswith("dropout_") and param[8:].isdigit():
        return f"[search] dropout[{param[8:]}]"
    if param.startswith("augment_"):
        return f"[search.augment] {param[8:]}"
    return f"[search] {param}"


def _advice(name: str, key: str, pinned: str | None, low: float, high: float) -> str | None:
    if pinned is None:
        return None
    if pinned == "low" and low == 0.0:
        return f"pinned at 0 (off): {name} does not help this model; fix it at 0 in {key}"
    if pinned == "high" and name.startswith("augment") and high >= 1.0:
        return f"pinned at the high edge {high:g}, the strongest augmentation there is"
    return f"pinned at the {pinned} edge: widen the range in {key}"


def importance_report(study: optuna.Study) -> dict[str, Any]:
    """Importances and the best trial's range positions (the ``--json`` shape)."""
    values, note = importances(study)
    try:
        best: FrozenTrial | None = study.best_trial
    except ValueError:
        best = None
    complete = _n_complete(study)
    return {
        "study": study.study_name,
        "complete_trials": complete,
        "importances": values,
        "note": note,
        "best_trial": None if best is None else best.number,
        "ranges": [] if best is None else [asdict(p) for p in range_positions(best)],
    }


# ---------------------------------------------------------------------------- best


def best_summary(study: optuna.Study, spec: StudySpec) -> dict[str, Any]:
    """The best trial as a stable, JSON-ready dict (the shape ``tuner best --json`` prints).

    Validation chooses; test figures (when the data has a test split) are reported beside it,
    with the median test loss of the completed trials, so a winner that only got lucky on the
    validation split shows. ``confirmed`` ranks the configurations of a confirm step.
    ``curve`` is the winner's learning curves, ``val_loss_turned_up_at`` the epoch after its
    lowest validation loss (``None``: still falling at the last epoch).
    """
    try:
        best = study.best_trial
    except ValueError:
        raise RuntimeFailure(render.no_completed_trial(study.study_name, "show", [
            t.state.name for t in study.get_trials(deepcopy=False)])) from None
    a = best.user_attrs
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    tests = [t.user_attrs[attrs.TEST_LOSS] for t in complete if attrs.TEST_LOSS in t.user_attrs]
    test_median = statistics.median(tests) if tests else None
    test_loss = a.get(attrs.TEST_LOSS)
    return {
        "study": study.study_name,
        "trial": best.number,
        "val_loss": best.value,
        "val_accuracy": a.get(attrs.VAL_ACCURACY),
        "train_loss": a.get(attrs.TRAIN_LOSS),
        "train_loss_training_mode": a.get(attrs.TRAIN_LOSS_TRAINING_MODE),
        "gap": a.get(attrs.GAP),
        "test_loss": test_loss,
        "test_accuracy": a.get(attrs.TEST_ACCURACY),
        "test_loss_median_of_completed": test_median,
        "test_worse_than_median": (None if test_loss is None or len(tests) < 3
                                   else test_loss > test_median),
        "best_epoch": a.get(attrs.BEST_EPOCH),
        "epochs_run": a.get(attrs.EPOCHS_RUN),
        "max_epochs": spec.model.epochs,
        "params": dict(best.params),
        "keras_val_loss": a.get(attrs.KERAS_VAL_LOSS),
        "host": a.get(attrs.HOST),
        "gpu": a.get(attrs.GPU),
        "seconds": a.get(attrs.SECONDS),
        "model_artifact": a.get(attrs.MODEL_ARTIFACT),
        "confirmed": _confirmed(study),
        "curve": a.get(attrs.CURVE),
        "val_loss_turned_up_at": turned_up_at((a.get(attrs.CURVE) or {}).get("val_loss") or []),
    }


def _confirmed(study: optuna.Study) -> dict[str, Any] | None:
    configs = confirm.ranking(study)
    if configs is None:
        return None
    request = study.user_attrs[attrs.CONFIRM]
    best = confirm.winner(configs)
    return {"top": request["top"], "seeds": request["seeds"],
            "pending": sum(c.pending for c in configs),
            "winner": best.as_dict() if best is not None else None,
            "configs": [c.as_dict() for c in configs]}
