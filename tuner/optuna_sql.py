"""Every query tuner runs on Optuna's own tables, in one place.

Optuna's storage API loads whole trials; a budget check, ``tuner status`` on 10,000 trials or
a sweep for dead workers needs a count or a few ids. These queries use the ``studies``,
``trials``, ``trial_values``, ``trial_heartbeats``, ``trial_intermediate_values`` and
``*_attributes`` tables of Optuna's schema (stable since Optuna 3) and nothing else.

Three write, where Optuna's API takes a transaction per value or refuses a finished trial: a
trial's attributes together (:func:`set_trial_user_attrs`, an upsert keyed as Optuna's unique
constraint is), one epoch's report (:func:`report_epochs`: the intermediate value and the
curves in one transaction, where ``Trial.report`` and an attribute write take two), and
forgetting a deleted model (:func:`forget_model`, as optuna-dashboard's own delete does). They
write exactly the rows Optuna writes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import sqlalchemy
from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX, ArtifactMeta

_text = sqlalchemy.text


def state_name(state: Any) -> str:
    """A trial state as stored (an enum on PostgreSQL, a string on SQLite) → its name."""
    return state.name if hasattr(state, "name") else str(state)


def studies(conn: sqlalchemy.Connection, name: str | None = None) -> list[tuple[int, str]]:
    """``(study_id, study_name)`` of every study (or of the one called ``name``)."""
    query = "SELECT study_id, study_name FROM studies"
    params: dict[str, Any] = {}
    if name is not None:
        query += " WHERE study_name = :name"
        params["name"] = name
    return [(i, n) for i, n in conn.execute(_text(query + " ORDER BY study_id"), params)]


def is_missing_table(exc: Exception) -> bool:
    """Whether a query failed because Optuna's tables are not there (nothing ran here yet)."""
    text = str(exc).lower()
    return "no such table" in text or ("relation" in text and "does not exist" in text)


def study_attr_everywhere(conn: sqlalchemy.Connection, key: str) -> list[Any]:
    """One user attribute of every study that has it, oldest study first."""
    rows = conn.execute(_text(
        "SELECT a.value_json FROM study_user_attributes a JOIN studies s "
        "ON s.study_id = a.study_id WHERE a.key = :key ORDER BY s.study_id"), {"key": key})
    return [json.loads(value) for (value,) in rows]


def count_states(conn: sqlalchemy.Connection, study_id: int) -> dict[str, int]:
    """Trials per state name with one ``GROUP BY`` (no trial rows are loaded)."""
    rows = conn.execute(_text("SELECT state, COUNT(*) FROM trials WHERE study_id = :sid "
                              "GROUP BY state"), {"sid": study_id}).all()
    return {state_name(state): n for state, n in rows}


def epochs_reported(conn: sqlalchemy.Connection, study_id: int) -> int:
    """Epochs trained in the whole study, every state: one reported value per epoch."""
    return int(conn.execute(_text(
        "SELECT COUNT(*) FROM trial_intermediate_values v JOIN trials t "
        "ON t.trial_id = v.trial_id WHERE t.study_id = :sid"), {"sid": study_id}).scalar_one())


def study_attr(conn: sqlalchemy.Connection, study_id: int, key: str) -> Any:
    """One study user attribute, decoded (``None`` if absent)."""
    return study_attrs(conn, study_id, (key,)).get(key)


def study_attrs(conn: sqlalchemy.Connection, study_id: int, keys: tuple[str, ...]
                ) -> dict[str, Any]:
    """Several study user attributes in one query (absent ones are left out)."""
    return _user_attrs(conn, "study", study_id, keys)


def trial_attrs(conn: sqlalchemy.Connection, trial_id: int, keys: tuple[str, ...]
                ) -> dict[str, Any]:
    """Several user attributes of one trial in one query (absent ones are left out)."""
    return _user_attrs(conn, "trial", trial_id, keys)


def _user_attrs(conn: sqlalchemy.Connection, owner: str, owner_id: int,
                keys: tuple[str, ...]) -> dict[str, Any]:
    rows = conn.execute(_text(
        f"SELECT key, value_json FROM {owner}_user_attributes WHERE {owner}_id = :id "
        "AND key IN :keys").bindparams(sqlalchemy.bindparam("keys", expanding=True)),
        {"id": owner_id, "keys": list(keys)}).all()
    return {key: json.loads(value) for key, value in rows}


def running_without_heartbeat(conn: sqlalchemy.Connection, study_id: int) -> list[int]:
    """Ids of RUNNING trials that never recorded a heartbeat."""
    return [row[0] for row in conn.execute(_text(
        "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h "
        "ON h.trial_id = t.trial_id WHERE t.study_id = :sid AND t.state = 'RUNNING' "
        "AND h.trial_id IS NULL"), {"sid": study_id})]


def server_uptime(conn: sqlalchemy.Connection) -> float | None:
    """Seconds since the database server started (PostgreSQL only; ``None`` elsewhere)."""
    if conn.engine.url.get_backend_name() != "postgresql":
        return None
    return float(conn.execute(_text(
        "SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())")).scalar_one())


def running_trials(conn: sqlalchemy.Connection, study_id: int, keys: tuple[str, ...]
                   ) -> list[dict[str, Any]]:
    """Each RUNNING trial: ``number``, ``heartbeat_age`` (seconds, by the database's clock,
    which writes the heartbeats), the last reported ``step``, and the user attributes
    ``keys``."""
    rows = conn.execute(_text(
        "SELECT t.trial_id, t.number, h.heartbeat FROM trials t "
        "LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE t.study_id = :sid AND t.state = 'RUNNING' ORDER BY t.number"
    ).columns(sqlalchemy.column("trial_id", sqlalchemy.Integer),
              sqlalchemy.column("number", sqlalchemy.Integer),
              sqlalchemy.column("heartbeat", sqlalchemy.DateTime)), {"sid": study_id}).all()
    if not rows:
        return []
    ids = {"ids": [r[0] for r in rows], "keys": list(keys)}
    expanding = (sqlalchemy.bindparam("ids", expanding=True),
                 sqlalchemy.bindparam("keys", expanding=True))
    found: dict[int, dict[str, Any]] = {r[0]: {} for r in rows}
    for trial_id, key, value in conn.execute(_text(
            "SELECT trial_id, key, value_json FROM trial_user_attributes "
            "WHERE trial_id IN :ids AND key IN :keys").bindparams(*expanding), ids):
        found[trial_id][key] = json.loads(value)
    steps = dict(conn.execute(_text(
        "SELECT trial_id, MAX(step) FROM trial_intermediate_values WHERE trial_id IN :ids "
        "GROUP BY trial_id").bindparams(expanding[0]), {"ids": ids["ids"]}).all())
    db_now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()
    db_now = db_now.replace(tzinfo=None) if db_now is not None else None
    return [{"number": number, "step": steps.get(trial_id), **found[trial_id],
             "heartbeat_age": (None if beat is None or db_now is None
                               else max(0.0, (db_now - beat).total_seconds()))}
            for trial_id, number, beat in rows]


def best_trial(conn: sqlalchemy.Connection, study_id: int) -> dict[str, Any] | None:
    """The best finite COMPLETE trial of a single-objective study: ``trial_id``, ``number``,
    ``value`` and ``datetime_complete`` (as Optuna wrote it: the worker's local time)."""
    direction = conn.execute(_text(
        "SELECT direction FROM study_directions WHERE study_id = :sid AND objective = 0"),
        {"sid": study_id}).scalar()
    order = "DESC" if direction is not None and state_name(direction) == "MAXIMIZE" else "ASC"
    row = conn.execute(_text(
        "SELECT t.trial_id, t.number, v.value, t.datetime_complete FROM trials t "
        "JOIN trial_values v ON v.trial_id = t.trial_id "
        "WHERE t.study_id = :sid AND t.state = 'COMPLETE' AND v.objective = 0 "
        f"AND v.value_type = 'FINITE' ORDER BY v.value {order}, t.number LIMIT 1"
    ).columns(sqlalchemy.column("trial_id", sqlalchemy.Integer),
              sqlalchemy.column("number", sqlalchemy.Integer),
              sqlalchemy.column("value", sqlalchemy.Float),
              sqlalchemy.column("datetime_complete", sqlalchemy.DateTime)),
        {"sid": study_id}).first()
    return None if row is None else dict(row._mapping)


def set_trial_user_attrs(conn: sqlalchemy.Connection, trial_id: int,
                         values: dict[str, Any]) -> None:
    """Several user attributes of one trial in one statement."""
    conn.execute(_text(
        "INSERT INTO trial_user_attributes (trial_id, key, value_json) "
        "VALUES (:tid, :key, :value) ON CONFLICT (trial_id, key) "
        "DO UPDATE SET value_json = excluded.value_json"),
        [{"tid": trial_id, "key": key, "value": json.dumps(value)}
         for key, value in values.items()])


def artifact_record(artifact_id: str, filename: str, mimetype: str) -> tuple[str, str]:
    """The trial system attribute (key, value) by which Optuna's ``upload_artifact`` records
    an artifact, and optuna-dashboard lists it: to write with other attributes at once."""
    meta = ArtifactMeta(artifact_id=artifact_id, filename=filename, mimetype=mimetype,
                        encoding=None)
    return ARTIFACTS_ATTR_PREFIX + artifact_id, json.dumps(asdict(meta))


def set_trial_system_attrs(conn: sqlalchemy.Connection, trial_id: int,
                           values: dict[str, Any]) -> None:
    """Several system attributes of one trial in one statement, encoded as Optuna's
    ``set_trial_system_attr`` encodes them."""
    conn.execute(_text(
        "INSERT INTO trial_system_attributes (trial_id, key, value_json) "
        "VALUES (:tid, :key, :value) ON CONFLICT (trial_id, key) "
        "DO UPDATE SET value_json = excluded.value_json"),
        [{"tid": trial_id, "key": key, "value": json.dumps(value)}
         for key, value in values.items()])


def report_epochs(conn: sqlalchemy.Connection, trial_id: int,
                  reports: list[tuple[int, float]], values: dict[str, Any]) -> bool:
    """Finite intermediate values ``(step, value)`` and user attributes of a RUNNING trial, as
    ``Trial.report`` and :func:`set_trial_user_attrs` write them; ``False`` (and nothing
    written) when the trial is no longer running: another worker judged it dead.

    On PostgreSQL one statement writes them all (the attributes are inserted from the rows
    the intermediate values' insert returned); elsewhere one statement each.
    """
    upsert_values = ("ON CONFLICT (trial_id, step) DO UPDATE SET "
                     "intermediate_value = excluded.intermediate_value, "
                     "intermediate_value_type = excluded.intermediate_value_type")
    upsert_attrs = "ON CONFLICT (trial_id, key) DO UPDATE SET value_json = excluded.value_json"
    if conn.engine.url.get_backend_name() == "postgresql" and values:
        params: dict[str, Any] = {"tid": trial_id}
        steps = []
        for i, (step, value) in enumerate(reports):
            steps.append(f"(CAST(:s{i} AS INTEGER), CAST(:v{i} AS DOUBLE PRECISION))")
            params.update({f"s{i}": step, f"v{i}": value})
        pairs = []
        for i, (key, value) in enumerate(values.items()):
            pairs.append(f"(CAST(:k{i} AS VARCHAR), CAST(:j{i} AS TEXT))")
            params.update({f"k{i}": key, f"j{i}": json.dumps(value)})
        return bool(conn.execute(_text(
            "WITH written AS (INSERT INTO trial_intermediate_values "
            "(trial_id, step, intermediate_value, intermediate_value_type) "
            "SELECT t.trial_id, r.step, r.value, 'FINITE' FROM trials t "
            f"CROSS JOIN (VALUES {', '.join(steps)}) AS r(step, value) "
            f"WHERE t.trial_id = :tid AND t.state = 'RUNNING' {upsert_values} "
            "RETURNING trial_id) "
            "INSERT INTO trial_user_attributes (trial_id, key, value_json) "
            "SELECT DISTINCT w.trial_id, a.key, a.value_json FROM written w "
            f"CROSS JOIN (VALUES {', '.join(pairs)}) AS a(key, value_json) {upsert_attrs}"),
            params).rowcount)
    for step, value in reports:
        written = conn.execute(_text(
            "INSERT INTO trial_intermediate_values "
            "(trial_id, step, intermediate_value, intermediate_value_type) "
            "SELECT trial_id, :step, :value, 'FINITE' FROM trials "
            f"WHERE trial_id = :tid AND state = 'RUNNING' {upsert_values}"),
            {"tid": trial_id, "step": step, "value": value}).rowcount
        if not written:
            return False
    set_trial_user_attrs(conn, trial_id, values)
    return True


def kept_models(conn: sqlalchemy.Connection, study_id: int, key: str
                ) -> list[tuple[int, int, float, str]]:
    """``(trial_id, number, value, artifact_id)`` of each COMPLETE trial whose user attribute
    ``key`` names a saved model, best value first."""
    rows = conn.execute(_text(
        "SELECT t.trial_id, t.number, v.value, a.value_json FROM trials t "
        "JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0 "
        "JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = :key "
        "WHERE t.study_id = :sid AND t.state = 'COMPLETE' AND a.value_json <> 'null' "
        "ORDER BY v.value, t.number"), {"sid": study_id, "key": key}).all()
    return [(tid, number, value, json.loads(artifact)) for tid, number, value, artifact in rows]


def failed_models(conn: sqlalchemy.Connection, study_id: int, key: str
                  ) -> list[tuple[int, str]]:
    """``(trial_id, artifact_id)`` of each FAIL trial whose user attribute ``key`` names a
    saved model: its worker was stopped, or judged dead, after recording it."""
    rows = conn.execute(_text(
        "SELECT t.trial_id, a.value_json FROM trials t "
        "JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = :key "
        "WHERE t.study_id = :sid AND t.state = 'FAIL' AND a.value_json <> 'null'"),
        {"sid": study_id, "key": key}).all()
    return [(tid, json.loads(artifact)) for tid, artifact in rows]


def count_trials_with(conn: sqlalchemy.Connection, study_id: int, key: str,
                      without: str | None = None) -> int:
    """How many of the study's trials carry the system attribute ``key`` (but not
    ``without``)."""
    sql = ("SELECT count(*) FROM trials t JOIN trial_system_attributes a "
           "ON a.trial_id = t.trial_id AND a.key = :key WHERE t.study_id = :sid")
    if without is not None:
        sql += (" AND NOT EXISTS (SELECT 1 FROM trial_system_attributes w "
                "WHERE w.trial_id = t.trial_id AND w.key = :without)")
    return int(conn.execute(_text(sql), {"sid": study_id, "key": key,
                                         "without": without}).scalar())


def confirm_runs_usage(conn: sqlalchemy.Connection, study_id: int, key: str) -> dict[str, int]:
    """The trials carrying the system attribute ``key`` (a confirm step's runs): how many in
    each state, by state name, and ``epochs``, the epochs they reported."""
    runs = ("JOIN trial_system_attributes a ON a.trial_id = t.trial_id AND a.key = :key "
            "WHERE t.study_id = :sid")
    params = {"sid": study_id, "key": key}
    out = {state_name(state): int(n) for state, n in conn.execute(_text(
        f"SELECT t.state, count(*) FROM trials t {runs} GROUP BY t.state"), params)}
    out["epochs"] = int(conn.execute(_text(
        "SELECT count(*) FROM trial_intermediate_values v JOIN trials t "
        f"ON t.trial_id = v.trial_id {runs}"), params).scalar_one())
    return out


def system_attr_trials(conn: sqlalchemy.Connection, study_id: int, key: str) -> set[int]:
    """Ids of the study's trials that carry the system attribute ``key``."""
    return {row[0] for row in conn.execute(_text(
        "SELECT t.trial_id FROM trials t JOIN trial_system_attributes a "
        "ON a.trial_id = t.trial_id WHERE t.study_id = :sid AND a.key = :key"),
        {"sid": study_id, "key": key})}


def forget_model(conn: sqlalchemy.Connection, trial_id: int, key: str,
                 artifact_id: str) -> None:
    """Clear a deleted model from its (finished) trial: the user attribute ``key`` becomes
    null, and Optuna's artifact record goes. A record left as null (optuna-dashboard's own
    delete writes one) breaks both the dashboard's study page and Optuna's
    ``get_all_artifact_meta``, which decode every record as an artifact."""
    conn.execute(_text(
        "UPDATE trial_user_attributes SET value_json = 'null' "
        "WHERE trial_id = :tid AND key = :key"), {"tid": trial_id, "key": key})
    conn.execute(_text(
        "DELETE FROM trial_system_attributes WHERE trial_id = :tid AND key = :key"),
        {"tid": trial_id, "key": ARTIFACTS_ATTR_PREFIX + artifact_id})
