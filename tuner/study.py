"""A study in the storage: created from a spec, found again by name, with its spec inside.

The spec is stored as the study's user attribute ``spec`` (JSON), so a worker on another node
needs only ``--study NAME --storage URL``. Samplers and pruners are rebuilt from the spec in
every process (Optuna does not store them).
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage

from tuner.errors import UserError
from tuner.spec import StudySpec

SPEC_ATTR = "spec"
ARTIFACTS_ATTR = "artifacts"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def create_or_resume(spec: StudySpec, storage: RDBStorage,
                     artifacts: str | None = None) -> tuple[optuna.Study, bool]:
    """Create the study, or resume it if it exists with the same search; returns (study, new).

    A changed ``n_trials`` is taken as a new budget; any other change is a user error, since
    mixing two search spaces in one study would corrupt the sampler's history.
    """
    existing = _stored_spec(storage, spec.name)
    if existing is not None:
        if replace(existing, n_trials=spec.n_trials) != spec:
            raise UserError(f"study {spec.name!r} already exists with a different study file; "
                            "give the study a new [study] name to start afresh")
        study = optuna.load_study(study_name=spec.name, storage=storage)
        if existing.n_trials != spec.n_trials:
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
        return study, False
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="minimize",
                                load_if_exists=True)
    study.set_user_attr(SPEC_ATTR, spec.to_dict())
    if artifacts:
        study.set_user_attr(ARTIFACTS_ATTR, artifacts)
    return study, True


def load(name: str, storage: RDBStorage) -> tuple[optuna.Study, StudySpec]:
    """The study and its spec, or a :class:`UserError` that lists the known studies."""
    spec = _stored_spec(storage, name)
    if spec is None:
        raise UserError(unknown_study_message(name, storage))
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=make_sampler(spec), pruner=make_pruner(spec))
    return study, spec


def unknown_study_message(name: str, storage: RDBStorage) -> str:
    names = [s.study_name for s in storage.get_all_studies()]
    hint = difflib.get_close_matches(name, names, n=1)
    if hint:
        return f"unknown study {name!r}: did you mean {hint[0]!r}?"
    if names:
        return f"unknown study {name!r}; studies here: {', '.join(sorted(names)[:10])}"
    return f"unknown study {name!r}: this storage holds no studies yet (run `tuner create` first)"


def make_sampler(spec: StudySpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = None if spec.seed is None else spec.seed + seed_offset
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    startup = max(3, min(10, spec.n_trials // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                      constant_liar=True)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    epochs = spec.model.epochs
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=min(2, epochs - 1))
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs,
                                              reduction_factor=3)
    if spec.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def count_states(storage: RDBStorage, study_id: int) -> dict[str, int]:
    """Trials per state with one ``GROUP BY`` (no trial rows are loaded)."""
    query = sqlalchemy.text("SELECT state, COUNT(*) FROM trials WHERE study_id = :sid "
                            "GROUP BY state")
    with storage.engine.connect() as conn:
        rows = conn.execute(query, {"sid": study_id}).all()
    return {_state_name(state): n for state, n in rows}


def _state_name(state: Any) -> str:
    return state.name if hasattr(state, "name") else str(state)


def _stored_spec(storage: RDBStorage, name: str) -> StudySpec | None:
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    raw = storage.get_study_user_attrs(study_id).get(SPEC_ATTR)
    if raw is None:
        raise UserError(f"study {name!r} was not created by tuner (it has no spec); "
                        "create it with `tuner create STUDY.toml`")
    return StudySpec.from_dict(raw)
