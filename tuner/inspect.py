"""Look into studies while they run: ``tuner status``, ``tuner trials``, ``tuner importance``.

``status`` must answer at once even for a study of tens of thousands of trials, so it never
loads trials: a handful of SQL queries per study (counts with one ``GROUP BY``, the best value
with one ``ORDER BY ... LIMIT 1``, and the running trials only) on Optuna's own tables. No
TensorFlow is imported anywhere on these paths.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from tuner import attrs, optuna_sql
from tuner import study as studies
from tuner.budget import Budget, Usage, describe_duration
from tuner.errors import UserError
from tuner.spec import StudySpec
from tuner.storage import mask, open_engine, open_storage, unreachable

STATES = ("running", "complete", "pruned", "failed", "waiting")
_STATE_NAMES = {"running": "RUNNING", "complete": "COMPLETE", "pruned": "PRUNED",
                "failed": "FAIL", "waiting": "WAITING"}
EDGE_FRACTION = 0.05
_OPTIONAL_COLUMNS = ("test_loss", "test_accuracy", "confirms", "fail_reason")
_LONG_COLUMNS = ("train_loss", "best_epoch", "started_at", "ended_at")  # in csv and json only


# ---------------------------------------------------------------------------- status


def to_json(value: Any) -> str:
    """The same JSON style as ``tuner best --json`` (without importing the worker)."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)


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


def study_status(storage: RDBStorage | SQLStorage, study_id: int, name: str) -> StudyStatus:
    """Counts, best so far and running trials of one study, in a few SQL queries."""
    with storage.engine.connect() as conn:
        counts = optuna_sql.count_states(conn, study_id)
        states = {key: counts.get(db, 0) for key, db in _STATE_NAMES.items()}
        spec = optuna_sql.study_attr(conn, study_id, attrs.SPEC)
        spec = spec if isinstance(spec, dict) else {}
        budget = Budget.from_spec(spec, optuna_sql.study_attr(conn, study_id, attrs.CLOCK_STARTED),
                                  optuna_sql.study_attr(conn, study_id, attrs.CONFIRM))
        epochs = (optuna_sql.epochs_reported(conn, study_id)
                  if budget.epochs is not None else None)
        best = optuna_sql.best_trial(conn, study_id) if states["complete"] else None
        found_at = None if best is None else _found_at(conn, best)
        running = _running(conn, study_id, spec) if states["running"] else []
    n_trials = budget.n_trials
    left = None if n_trials is None else max(0, n_trials - states["complete"] - states["pruned"])
    usage = Usage.from_counts(counts, epochs or 0)
    return StudyStatus(
        study=name, states=states, n_trials=n_trials, left=left,
        best_trial=best["number"] if best else None,
        best_value=best["value"] if best else None,
        best_found_at=found_at,
        running=running,
        epoch_budget=budget.epochs, epochs=epochs, time_budget=budget.seconds,
        budget=f"{budget.describe()}: {budget.progress(usage)}" if spec else "",
    )


class SQLStorage:
    """Just an engine on Optuna's tables: all ``status`` needs (see :func:`open_engine`)."""

    def __init__(self, url: str) -> None:
        self.engine = open_engine(url)
        self.url = url


def all_status(storage: RDBStorage | SQLStorage, name: str | None = None
               ) -> list[StudyStatus]:
    """Status of every study in the storage (or of ``name``: unknown is a user error)."""
    query = "SELECT study_id, study_name FROM studies"
    params: dict[str, Any] = {}
    if name is not None:
        query += " WHERE study_name = :name"
        params["name"] = name
    try:
        with storage.engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text(query + " ORDER BY study_id"), params).all()
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError) as exc:
        if not _no_table(exc):
            raise unreachable(storage.engine.url.render_as_string(hide_password=False),
                              exc) from None
        rows = []  # a database nothing has run in yet: no Optuna tables
    if name is not None and not rows:
        full = storage if isinstance(storage, RDBStorage) else open_storage(
            storage.engine.url.render_as_string(hide_password=False), heartbeat=False)
        raise UserError(studies.unknown_study_message(name, full))
    return [study_status(storage, sid, sname) for sid, sname in rows]


def status_command(url: str, study: str | None, as_json: bool = False) -> int:
    """``tuner status``: print every study's (or one study's) state; exit code."""
    storage = SQLStorage(url)
    try:
        found = all_status(storage, study)
    finally:
        storage.engine.dispose()
    if as_json:
        print(to_json({"storage": mask(url), "studies": [_status_dict(s) for s in found]}))
    elif not found:
        print(f"No studies in {mask(url)} yet: start one with `tuner run STUDY.toml`.")
    else:
        print("\n\n".join(format_status(s) for s in found))
    return 0


def _no_table(exc: Exception) -> bool:
    text = str(exc).lower()
    return "no such table" in text or ("relation" in text and "does not exist" in text)


def format_status(s: StudyStatus, now: dt.datetime | None = None) -> str:
    """A study's status as a few aligned lines."""
    now = now or _utcnow()
    if s.n_trials is not None and s.epoch_budget is None and s.time_budget is None:
        budget = f"{s.n_trials} trials budget, {s.left} left"
    elif s.budget:
        budget = f"budget {s.budget}"
    else:
        budget = "no budget recorded"
    lines = [
        f"Study {s.study!r}: {budget}",
        "  trials   " + ", ".join(f"{s.states[k]} {k}" for k in STATES),
    ]
    if s.best_value is None:
        lines.append("  best     - (no completed trial yet)")
    else:
        found = dt.datetime.fromisoformat(s.best_found_at) if s.best_found_at else None
        when = (f", found {found.astimezone().strftime('%Y-%m-%d %H:%M:%S')} "
                f"({_ago((now - found).total_seconds())} ago)") if found else ""
        lines.append(f"  best     val_loss {s.best_value:.4f} (trial #{s.best_trial}){when}")
    if s.running:
        rows = [["trial", "host", "gpu", "epoch", "epoch ended", "running", "heartbeat"]]
        for r in s.running:
            epoch = "-" if r.epoch is None else str(r.epoch)
            if r.max_epochs is not None:
                epoch += f"/{r.max_epochs}"
            rows.append([f"#{r.trial}", r.host or "-", r.gpu or "-", epoch,
                         "-" if r.last_epoch_age_s is None else f"{_ago(r.last_epoch_age_s)} ago",
                         "-" if r.running_s is None else _ago(r.running_s),
                         "none yet" if r.heartbeat_age_s is None
                         else f"{_ago(r.heartbeat_age_s)} ago"])
        table = _align(rows).splitlines()
        lines.append("  running  " + table[0])
        lines.extend("           " + row for row in table[1:])
    return "\n".join(lines)


def _status_dict(s: StudyStatus) -> dict[str, Any]:
    return asdict(s)


def _running(conn: sqlalchemy.Connection, study_id: int, spec: Any) -> list[RunningTrial]:
    """Running trials with host, GPU, last finished epoch and its age, and heartbeat age.

    Times come from the trial's ``started_at`` (UTC seconds) and its curve's epoch times, so a
    worker's time zone never shows; heartbeat ages use the database's clock, which writes them.
    """
    keys = (attrs.HOST, attrs.GPU, attrs.STARTED_AT, attrs.CURVE)
    now = _utcnow().timestamp()
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


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ago(seconds: float) -> str:
    return describe_duration(max(0, round(seconds)))


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


def format_trials(rows: list[dict[str, Any]], fmt: str) -> str:
    """``table`` (aligned), ``csv`` (header row) or ``json`` (a list of objects)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if not rows:
        return "" if fmt == "csv" else "(no trials yet)"
    keys = list(rows[0])
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
        return out.getvalue().rstrip("\n")
    for key in _OPTIONAL_COLUMNS:  # the table leaves out columns with nothing in them
        if all(r[key] is None for r in rows):
            keys.remove(key)
    for key in _LONG_COLUMNS:
        keys.remove(key)
    table = [keys] + [[_cell(k, r[k]) for k in keys] for r in rows]
    return _align(table, right={i for i, k in enumerate(keys)
                                if k not in ("state", "host", "fail_reason")})


def trials_command(url: str, name: str, fmt: str = "table") -> int:
    """``tuner trials``: every trial of a study as a table, CSV or JSON."""
    study, spec = studies.load(name, open_storage(url, heartbeat=False))
    print(format_trials(trial_rows(study, spec), fmt))
    return 0


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "seconds":
        return f"{value:.1f}"
    if isinstance(value, float):
        if key in ("val_loss", "val_accuracy", "gap"):
            return f"{value:.4f}"
        return f"{value:.3g}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _align(rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right or set()
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
        for r in rows)


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


def format_importance(report: dict[str, Any]) -> str:
    lines = []
    if report["importances"] is None:
        lines.append(f"Parameter importances: {report['note']}")
    else:
        lines.append(f"Parameter importances of study {report['study']!r} "
                     f"(fANOVA over {report['complete_trials']} completed trials)")
        width = max(len(k) for k in report["importances"]) if report["importances"] else 0
        for name, value in report["importances"].items():
            bar = "#" * int(round(value * 30))
            lines.append(f"  {name:<{width}}  {value:5.2f}  {bar}")
    if report["best_trial"] is None:
        lines.append("No completed trial yet: nothing to say about the search ranges.")
        return "\n".join(lines)
    lines.append(f"Best trial #{report['best_trial']}: where each value sits in its range "
                 "(0% = low edge, 100% = high edge)")
    rows = []
    for p in report["ranges"]:
        scale = " log" if p["log"] else ""
        rows.append([p["param"], _num(p["value"]), f"[{_num(p['low'])}, {_num(p['high'])}]"
                     f"{scale}", f"{100 * p['position']:.0f}%", p["advice"] or "ok"])
    if rows:
        lines.extend("  " + row for row in _align(rows, right={1, 3}).splitlines())
    return "\n".join(lines)


def importance_command(url: str, name: str, as_json: bool = False) -> int:
    """``tuner importance``: which knob mattered, and which ranges to widen."""
    study, _ = studies.load(name, open_storage(url, heartbeat=False))
    report = importance_report(study)
    print(to_json(report) if as_json else format_importance(report))
    return 0


def _num(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e4:
        return f"{value:.3g}"
    return f"{value:.3f}".rstrip("0").rstrip(".")
