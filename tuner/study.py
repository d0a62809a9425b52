"""A study in the storage: created from a spec, found again by name, with its spec inside.

The spec is stored as the study's user attribute ``spec`` (JSON), so a worker on another node
needs only ``--study NAME --storage URL``. Samplers and pruners are rebuilt from the spec in
every process (Optuna does not store them).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import replace
from typing import Any

import optuna
from optuna.storages import RDBStorage

from tuner import attrs
from tuner.budget import budget_lock
from tuner.errors import UserError
from tuner.pruning import make_pruner
from tuner.render import duration
from tuner.space import param_names
from tuner.spec import CHANGEABLE_FIELDS, StudySpec
from tuner.urls import mask


def create_or_resume(spec: StudySpec, storage: RDBStorage,
                     artifacts: str | None = None) -> tuple[optuna.Study, bool]:
    """Create the study, or resume it if it exists with the same search; returns (study, new),
    the study with the spec's sampler and pruner.

    A changed budget (``n_trials``, ``epoch_budget``, ``time_budget``, ``trial_timeout``) or
    ``keep_models`` is taken as the new setting, and running workers obey it from their next
    claim (a lowered ``keep_models`` once their next trial is done); any other change
    is a user error, since mixing two search spaces in one study would corrupt the sampler's
    history. Under the claim path's lock (held for milliseconds here): several processes
    starting a new study together (a job array, pods) create it once, and the others check
    their file against the stored one.
    """
    with budget_lock(storage, spec.name):
        return _create_or_resume(spec, storage, artifacts)


def _create_or_resume(spec: StudySpec, storage: RDBStorage,
                      artifacts: str | None) -> tuple[optuna.Study, bool]:
    existing = _stored_spec(storage, spec.name, locked=True, unfinished_ok=True)
    if existing is not None:
        budget = {field: getattr(spec, field) for field in CHANGEABLE_FIELDS}
        if replace(existing, **budget) != spec:
            changed = _changed_keys(replace(existing, **budget), spec)
            raise UserError(f"study {spec.name!r} already exists with another {changed}; only "
                            f"{', '.join(CHANGEABLE_FIELDS)} may change: give the study a new "
                            "[study] name to start afresh")
        study = optuna.load_study(study_name=spec.name, storage=storage,
                                  sampler=make_sampler(spec), pruner=make_pruner(spec))
        if existing != spec:
            study.set_user_attr(attrs.SPEC, spec.to_dict())
        return study, False
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="minimize",
                                sampler=make_sampler(spec), pruner=make_pruner(spec),
                                load_if_exists=True)  # a creation cut short: finish it
    study.set_user_attr(attrs.SPEC, spec.to_dict())
    if artifacts:
        study.set_user_attr(attrs.ARTIFACTS, artifacts)
    return study, True


def changed_settings(spec: StudySpec, storage: RDBStorage) -> list[str]:
    """The changeable settings (budgets, ``keep_models``) in which ``spec`` differs from the
    stored study's, as ``n_trials 6 → 3``; none for a new study."""
    existing = _stored_spec(storage, spec.name, unfinished_ok=True)
    if existing is None:
        return []
    def shown(field: str, value: Any) -> str:
        if field == "keep_models" and value is None:
            return '"all"'
        if field in ("time_budget", "trial_timeout") and value is not None:
            return duration(value)  # as the study file writes it: 2h, not 7200.0
        return _toml(value)

    return [f"{field} {shown(field, getattr(existing, field))} → "
            f"{shown(field, getattr(spec, field))}"
            for field in CHANGEABLE_FIELDS if getattr(existing, field) != getattr(spec, field)]


def _changed_keys(stored: StudySpec, new: StudySpec) -> str:
    """``[model] epochs (16, stored 20)``: what differs, as the study file spells it."""
    def flat(spec: StudySpec) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in spec.to_dict().items():
            if isinstance(value, dict):
                out.update({f"[{key}] {k}": v for k, v in value.items()})
            else:
                out[f"[study] {key}"] = value
        return out

    before, after = flat(stored), flat(new)
    keys = [k for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]
    shown = [f"{k} ({_toml(after.get(k))}, stored {_toml(before.get(k))})" for k in keys[:3]]
    return ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _toml(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


def load(name: str, storage: RDBStorage) -> tuple[optuna.Study, StudySpec]:
    """The study and its spec, or a :class:`UserError` that lists the known studies."""
    spec = _stored_spec(storage, name)
    if spec is None:
        raise UserError(unknown_study_message(
            name, [s.study_name for s in storage.get_all_studies()], mask(storage.url)))
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=make_sampler(spec), pruner=make_pruner(spec))
    return study, spec


def unknown_study_message(name: str, names: list[str], where: str = "this storage") -> str:
    """Which study the user may have meant, among ``names`` (the studies in ``where``, a
    masked URL): else which database was asked, since the study may live in another."""
    hint = difflib.get_close_matches(name, names, n=1)
    if hint:
        return f"unknown study {name!r}: did you mean {hint[0]!r}?"
    elsewhere = "; another database: --storage URL or $TUNER_STORAGE"
    if names:
        return (f"unknown study {name!r} in {where}, which holds "
                f"{', '.join(sorted(names)[:10])}{elsewhere}")
    return (f"unknown study {name!r}: {where} holds no studies yet (create one with "
            f"`tuner create STUDY.toml`){elsewhere}")


def make_sampler(spec: StudySpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler. TPE samples at random for its first quarter of the trials the study
    is expected to run (at least one more than the knobs searched, at most Optuna's 10), so
    that a small budget is not spent entirely on random trials."""
    seed = None if spec.seed is None else spec.seed + seed_offset
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    floor = len(param_names(spec)) + 1
    startup = max(floor, min(10, expected_trials(spec) // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                      constant_liar=True)


def expected_trials(spec: StudySpec) -> int:
    """How many trials the study will run: ``n_trials``, or what its epoch budget buys (a
    pruned trial costing about half a full one), or 40 when only time limits it."""
    guesses = [spec.n_trials] if spec.n_trials is not None else []
    if spec.epoch_budget is not None:
        per_trial = spec.model.epochs * (1.0 if spec.pruner == "none" else 0.5)
        guesses.append(math.ceil(spec.epoch_budget / per_trial))
    return min(guesses) if guesses else 40


def _stored_spec(storage: RDBStorage, name: str, *, locked: bool = False,
                 unfinished_ok: bool = False) -> StudySpec | None:
    """The spec stored in study ``name``; ``None`` if there is no such study. ``locked``: the
    caller holds the claim lock, under which studies are created. ``unfinished_ok``: a
    creation cut short (the study made, the process stopped before its spec was stored) counts
    as no study, for the creator to finish."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    raw = storage.get_study_user_attrs(study_id).get(attrs.SPEC)
    if raw is None and not locked:
        # Created this instant by another process, which stores the spec before it lets go
        # of the lock (a worker pod started as `tuner create` runs): wait for it, read again.
        with budget_lock(storage, name):
            raw = storage.get_study_user_attrs(study_id).get(attrs.SPEC)
    if raw is not None:
        return StudySpec.from_dict(raw)
    unfinished = (not storage.get_all_trials(study_id, deepcopy=False)
                  and storage.get_study_directions(study_id)
                  == [optuna.study.StudyDirection.MINIMIZE])
    if unfinished and unfinished_ok:
        return None
    if unfinished:
        raise UserError(f"study {name!r} was never fully created (the command creating it "
                        "was stopped): run `tuner create STUDY.toml` again to finish it")
    raise UserError(f"study {name!r} was not created by tuner (it has no spec); "
                    "create it with `tuner create STUDY.toml`")
