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

from tuner import study as studies
from tuner.errors import RuntimeFailure, UserError
from tuner.spec import StudySpec
from tuner.storage import mask, open_storage

STATES = ("running", "complete", "pruned", "failed", "waiting")
_STATE_NAMES = {"running": "RUNNING", "complete": "COMPLETE", "pruned": "PRUNED",
                "failed": "FAIL", "waiting": "WAITING"}
EDGE_FRACTION = 0.05
TRIAL_COLUMNS = ("val_loss", "val_accuracy", "gap", "epochs_run", "pruned_at", "host", "seconds",
                 "fail_reason")


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


def study_status(storage: RDBStorage | SQLStorage, study_id: int, name: str) -> StudyStatus:
    """Counts, best so far and running trials of one study, in a few SQL queries."""
    counts = studies.count_states(storage, study_id)
    states = {key: counts.get(db, 0) for key, db in _STATE_NAMES.items()}
    with storage.engine.connect() as conn:
        spec = _study_attr(conn, study_id, studies.SPEC_ATTR)
        maximize = _maximize(conn, study_id)
        best = _best_row(conn, study_id, maximize) if states["complete"] else None
        running = _running(conn, study_id, spec) if states["running"] else []
    n_trials = spec.get("n_trials") if isinstance(spec, dict) else None
    left = None if n_trials is None else max(0, n_trials - states["complete"] - states["pruned"])
    return StudyStatus(
        study=name, states=states, n_trials=n_trials, left=left,
        best_trial=best[0] if best else None,
        best_value=best[1] if best else None,
        best_found_at=_iso_utc(best[2]) if best else None,
        running=running,
    )


class SQLStorage:
    """Just an engine on Optuna's tables: all ``status`` needs.

    Opening an ``RDBStorage`` imports Alembic and checks the schema, which costs more than
    everything else ``status`` does together; these read-only queries need none of it.
    """

    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {"poolclass": sqlalchemy.pool.NullPool}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 60}
        try:
            self.engine = sqlalchemy.create_engine(url, **kwargs)
        except (sqlalchemy.exc.ArgumentError, ImportError) as exc:
            raise RuntimeFailure(f"cannot open storage {mask(url)}: {exc}") from None
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
            url = storage.engine.url
            text = _first_line(exc).replace(url.password, "***") if url.password else \
                _first_line(exc)
            raise RuntimeFailure(f"cannot open storage {url.render_as_string()}: "
                                 f"{text}") from None
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


def _first_line(exc: Exception) -> str:
    cause = getattr(exc, "orig", None) or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def format_status(s: StudyStatus, now: dt.datetime | None = None) -> str:
    """A study's status as a few aligned lines."""
    now = now or _utcnow()
    budget = f"{s.n_trials} trials budget, {s.left} left" if s.n_trials is not None else \
        "no budget recorded"
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
        rows = [["trial", "host", "gpu", "epoch", "running", "heartbeat"]]
        for r in s.running:
            epoch = "-" if r.epoch is None else str(r.epoch)
            if r.max_epochs is not None:
                epoch += f"/{r.max_epochs}"
            rows.append([f"#{r.trial}", r.host or "-", r.gpu or "-", epoch,
                         "-" if r.running_s is None else _ago(r.running_s),
                         "none yet" if r.heartbeat_age_s is None
                         else f"{_ago(r.heartbeat_age_s)} ago"])
        table = _align(rows).splitlines()
        lines.append("  running  " + table[0])
        lines.extend("           " + row for row in table[1:])
    return "\n".join(lines)


def _status_dict(s: StudyStatus) -> dict[str, Any]:
    return asdict(s)


def _study_attr(conn: sqlalchemy.Connection, study_id: int, key: str) -> Any:
    row = conn.execute(sqlalchemy.text(
        "SELECT value_json FROM study_user_attributes WHERE study_id = :sid AND key = :key"),
        {"sid": study_id, "key": key}).first()
    return json.loads(row[0]) if row else None


def _maximize(conn: sqlalchemy.Connection, study_id: int) -> bool:
    row = conn.execute(sqlalchemy.text(
        "SELECT direction FROM study_directions WHERE study_id = :sid AND objective = 0"),
        {"sid": study_id}).first()
    return row is not None and studies._state_name(row[0]) == "MAXIMIZE"


def _best_row(conn: sqlalchemy.Connection, study_id: int, maximize: bool
              ) -> tuple[int, float, dt.datetime | None] | None:
    """(number, value, datetime_complete) of the best finite completed trial."""
    order = "DESC" if maximize else "ASC"
    query = sqlalchemy.text(
        "SELECT t.number, v.value, t.datetime_complete FROM trials t "
        "JOIN trial_values v ON v.trial_id = t.trial_id "
        "WHERE t.study_id = :sid AND t.state = :state AND v.objective = 0 "
        f"AND v.value_type = :finite ORDER BY v.value {order}, t.number LIMIT 1"
    ).columns(sqlalchemy.column("number", sqlalchemy.Integer),
              sqlalchemy.column("value", sqlalchemy.Float),
              sqlalchemy.column("datetime_complete", sqlalchemy.DateTime))
    row = conn.execute(query, {"sid": study_id, "state": "COMPLETE", "finite": "FINITE"}).first()
    return (row[0], row[1], row[2]) if row else None


def _running(conn: sqlalchemy.Connection, study_id: int, spec: Any) -> list[RunningTrial]:
    """Running trials with host, GPU, last reported epoch and heartbeat age."""
    query = sqlalchemy.text(
        "SELECT t.trial_id, t.number, t.datetime_start, h.heartbeat FROM trials t "
        "LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE t.study_id = :sid AND t.state = :state ORDER BY t.number"
    ).columns(sqlalchemy.column("trial_id", sqlalchemy.Integer),
              sqlalchemy.column("number", sqlalchemy.Integer),
              sqlalchemy.column("datetime_start", sqlalchemy.DateTime),
              sqlalchemy.column("heartbeat", sqlalchemy.DateTime))
    rows = conn.execute(query, {"sid": study_id, "state": "RUNNING"}).all()
    if not rows:
        return []
    ids = [r[0] for r in rows]
    attrs: dict[tuple[int, str], Any] = {}
    for trial_id, key, value in conn.execute(sqlalchemy.text(
            "SELECT trial_id, key, value_json FROM trial_user_attributes "
            "WHERE trial_id IN :ids AND key IN ('host', 'gpu')").bindparams(
            sqlalchemy.bindparam("ids", expanding=True)), {"ids": ids}):
        attrs[(trial_id, key)] = json.loads(value)
    epochs = dict(conn.execute(sqlalchemy.text(
        "SELECT trial_id, MAX(step) FROM trial_intermediate_values WHERE trial_id IN :ids "
        "GROUP BY trial_id").bindparams(sqlalchemy.bindparam("ids", expanding=True)),
        {"ids": ids}).all())
    # The database's clock, as Optuna's own stale-trial check uses: heartbeats are written
    # with it, so worker clocks that drift do not matter.
    db_now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()
    db_now = db_now.replace(tzinfo=None) if isinstance(db_now, dt.datetime) else None
    utc_now = _utcnow().replace(tzinfo=None)
    max_epochs = spec.get("model", {}).get("epochs") if isinstance(spec, dict) else None
    return [
        RunningTrial(
            trial=number, host=attrs.get((trial_id, "host")), gpu=attrs.get((trial_id, "gpu")),
            epoch=epochs.get(trial_id), max_epochs=max_epochs,
            running_s=None if start is None else round((utc_now - start).total_seconds(), 1),
            heartbeat_age_s=(None if beat is None or db_now is None
                             else round(max(0.0, (db_now - beat).total_seconds()), 1)),
        )
        for trial_id, number, start, beat in rows
    ]


def _iso_utc(value: dt.datetime | None) -> str | None:
    """Optuna keeps naive UTC datetimes in its tables."""
    return None if value is None else value.replace(tzinfo=dt.UTC).isoformat()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ago(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600:02d}h"


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
    attrs = t.user_attrs
    val_loss = t.value
    if t.state == TrialState.PRUNED and t.intermediate_values:
        finite = [v for v in t.intermediate_values.values() if math.isfinite(v)]
        val_loss = min(finite) if finite else None
    row: dict[str, Any] = {"number": t.number, "state": t.state.name}
    row.update({name: t.params.get(name) for name in names})
    row.update({
        "val_loss": val_loss,
        "val_accuracy": attrs.get("val_accuracy"),
        "gap": attrs.get("gap"),
        "epochs_run": attrs.get("epochs_run"),
        "pruned_at": attrs.get("pruned_at"),
        "host": attrs.get("host"),
        "seconds": attrs.get("seconds"),
        "fail_reason": attrs.get("fail_reason"),
    })
    return {k: _finite(v) for k, v in row.items()}


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
    if all(r["fail_reason"] is None for r in rows):
        keys.remove("fail_reason")
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
