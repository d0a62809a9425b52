"""The confirm step: a winner that is not luck.

Retraining one configuration with another seed moves its validation loss by about as much as
separates good configurations, so the best single trial is partly chosen by chance.
:func:`queue` puts the top ``K`` configurations back in the queue, ``M`` times each, as
ordinary WAITING trials of the same study: the workers on the GPU nodes run them (each with a
seed of its own, since a trial's seed follows its number), they are never pruned, and the
study's budget grows by exactly their number. :func:`ranking` then ranks configurations by
their mean validation loss over every run, with its spread.

Queuing happens once, under the study's budget lock, however many times (or from however many
machines) it is asked for; the request is kept in the study attribute ``confirm``.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from tuner import attrs
from tuner.budget import budget_lock
from tuner.errors import RuntimeFailure, UserError

# Bounds on one confirm request: it is queued once, under the lock every worker's claim takes,
# and cannot be taken back, so a typo must not queue (or hold up workers for) 10**8 runs.
MAX_TOP = 50
MAX_SEEDS = 20


@dataclass(frozen=True)
class Queued:
    """What a confirm request holds: the configurations and how many runs were queued."""

    top: int
    seeds: int
    configs: list[int]
    trials: int
    added: int = 0  # runs queued by this call (the missing ones, after a call stopped halfway)

    @property
    def new(self) -> bool:
        """Whether this call queued runs, rather than finding them queued already."""
        return self.added > 0


def queue(study: optuna.Study, storage: RDBStorage, top: int, seeds: int) -> Queued:
    """Queue ``seeds`` new runs of each of the ``top`` best configurations (once per study).

    The request is recorded first, then its runs are queued one by one: a call stopped in
    between is finished by the next one, which queues only the runs still missing (the budget
    grows by the runs that exist, :func:`tuner.budget.confirm_runs`)."""
    if top < 1 or seeds < 1:
        raise UserError("confirm: --top and --seeds must be at least 1")
    if top > MAX_TOP or seeds > MAX_SEEDS:
        raise UserError(f"confirm: --top {top} --seeds {seeds} asks for too many runs: at most "
                        f"--top {MAX_TOP} and --seeds {MAX_SEEDS} (a few runs of a few "
                        "configurations tell luck from merit; a study is confirmed once)")
    with budget_lock(storage, study.study_name):
        request = study.user_attrs.get(attrs.CONFIRM)  # read afresh from the storage
        trials = study.get_trials(deepcopy=False)
        if request is None:
            best = _best_configurations(trials, top)
            if not best:  # not the user's mistake: exit 1, as `tuner best` and `plot` do
                raise RuntimeFailure(f"study {study.study_name!r} has no completed trial to "
                                     "confirm yet (see `tuner status`)")
            # What the search has spent so far, and the trials it is running (they will
            # count when they finish): the confirm runs come on top of it, even in a study
            # whose budget was lowered below it (they would never run otherwise).
            request = {"top": top, "seeds": seeds, "configs": [t.number for t in best],
                       "trials": len(best) * seeds,
                       "searched": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                                   TrialState.RUNNING) for t in trials),
                       "searched_epochs": sum(len(t.intermediate_values) for t in trials)}
            study.set_user_attr(attrs.CONFIRM, request)
        queued = Counter(t.system_attrs[attrs.CONFIRMS] for t in trials
                         if attrs.CONFIRMS in t.system_attrs
                         and "failed_trial" not in t.system_attrs)  # reruns replace, not add
        added = 0
        for number in request["configs"]:
            origin = trials[number]
            for _ in range(request["seeds"] - queued[number]):
                study.add_trial(optuna.trial.create_trial(
                    state=TrialState.WAITING, params=origin.params,
                    distributions=origin.distributions,
                    system_attrs={attrs.CONFIRMS: number}))
                added += 1
    return Queued(request["top"], request["seeds"], request["configs"], request["trials"],
                  added)


def _best_configurations(trials: list[FrozenTrial], top: int) -> list[FrozenTrial]:
    """The ``top`` completed trials with the lowest validation loss, one per configuration."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE
                and t.value is not None and math.isfinite(t.value)
                and attrs.CONFIRMS not in t.system_attrs]
    seen: set[tuple[tuple[str, Any], ...]] = set()
    best = []
    for t in sorted(complete, key=lambda t: (t.value, t.number)):
        key = tuple(sorted(t.params.items()))
        if key not in seen:
            seen.add(key)
            best.append(t)
    return best[:top]


@dataclass
class Configuration:
    """One confirmed configuration: every finished run of it and their spread."""

    trial: int  # the search trial it came from
    params: dict[str, Any]
    runs: list[int] = field(default_factory=list)  # trial numbers of its COMPLETE runs
    val_losses: list[float] = field(default_factory=list)
    test_losses: list[float] = field(default_factory=list)
    pending: int = 0  # runs queued or running

    @property
    def val_loss_mean(self) -> float:
        return statistics.fmean(self.val_losses)

    @property
    def val_loss_std(self) -> float:
        return statistics.stdev(self.val_losses) if len(self.val_losses) > 1 else 0.0

    @property
    def test_loss_mean(self) -> float | None:
        return statistics.fmean(self.test_losses) if self.test_losses else None

    def as_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "params": self.params, "runs": self.runs,
                "val_loss_mean": self.val_loss_mean, "val_loss_std": self.val_loss_std,
                "test_loss_mean": self.test_loss_mean, "pending": self.pending}


def ranking(study: optuna.Study) -> list[Configuration] | None:
    """The confirmed configurations, best mean validation loss first (``None``: not asked)."""
    request = study.user_attrs.get(attrs.CONFIRM)
    if request is None:
        return None
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    configs = {n: Configuration(n, dict(by_number[n].params)) for n in request["configs"]}
    for t in trials:
        origin = t.system_attrs.get(attrs.CONFIRMS, t.number)
        config = configs.get(origin)
        if config is None:
            continue
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            config.runs.append(t.number)
            config.val_losses.append(t.value)
            if attrs.TEST_LOSS in t.user_attrs:
                config.test_losses.append(float(t.user_attrs[attrs.TEST_LOSS]))
        elif t.state in (TrialState.WAITING, TrialState.RUNNING):
            config.pending += 1
    return sorted(configs.values(), key=lambda c: (c.val_loss_mean, c.trial))


def winner(configs: list[Configuration]) -> Configuration | None:
    """The best-ranked configuration that has at least one new run completed: before any, the
    ranking is the search's own single runs, which is what the confirm step doubts."""
    confirmed = [c for c in configs if len(c.runs) > 1]
    return confirmed[0] if confirmed else None


def is_confirmation(trial: optuna.Trial | FrozenTrial) -> bool:
    """Whether ``trial`` retrains a configuration for the confirm step (never pruned)."""
    return attrs.CONFIRMS in trial.system_attrs
