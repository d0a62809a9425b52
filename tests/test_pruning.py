"""Pruning must not punish regularization: the warm-up means what it says, scales with the
study's epochs, and a slow starter that overtakes is not stopped before it can. No TensorFlow."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution

from tuner.pruning import make_pruner, warmup_epochs
from tuner.spec import parse_spec


def spec_for(epochs: int, pruner: str = "median", **study: object) -> object:
    return parse_spec({"study": {"name": "p", "pruner": pruner, **study},
                       "model": {"epochs": epochs}})


def _study_with_light_trials(pruner: optuna.pruners.BasePruner, curve: list[float],
                             n: int = 6) -> optuna.Study:
    """``n`` completed trials that learn fast and plateau (lightly regularized)."""
    study = optuna.create_study(pruner=pruner)
    for i in range(n):
        study.add_trial(optuna.trial.create_trial(
            params={"l2": 1e-5}, distributions={"l2": FloatDistribution(1e-6, 1e-1, log=True)},
            value=min(curve) + 0.01 * i,
            intermediate_values={e + 1: v + 0.01 * i for e, v in enumerate(curve)}))
    return study


def _study_with_light_runs(pruner: optuna.pruners.BasePruner, n: int = 12) -> optuna.Study:
    """``n`` light trials run as a worker runs them (asked, each epoch reported and the pruner
    asked, told), so that the ranked pruners (Hyperband, successive halving) have their rungs.
    They complete whatever the pruner says: the competition stays the same for every rule."""
    study = optuna.create_study(pruner=pruner, study_name="light")
    for i in range(n):
        trial = study.ask()
        for epoch, value in enumerate(LIGHT, start=1):
            trial.report(value + 0.01 * i, epoch)
            trial.should_prune()
        study.tell(trial, min(LIGHT) + 0.01 * i)
    return study


def _first_pruned_epoch(study: optuna.Study, curve: list[float]) -> int | None:
    trial = study.ask()
    for epoch, value in enumerate(curve, start=1):
        trial.report(value, epoch)  # tuner reports epoch e as step e
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return epoch
    study.tell(trial, min(curve))
    return None


LIGHT = [0.9, 0.45, 0.36, 0.33, 0.32, 0.31, 0.31, 0.31, 0.30, 0.30] + [0.30] * 10
# Heavy L2 and augmentation: slow for five epochs, then better than every light trial.
HEAVY = [2.2, 1.9, 1.4, 0.9, 0.45, 0.29, 0.25, 0.22, 0.21, 0.20] + [0.19] * 10


@pytest.mark.parametrize("pruner", ["median", "trend", "percentile", "patient", "hyperband",
                                    "successive-halving"])
def test_a_slow_starter_that_overtakes_after_epoch_5_is_not_pruned_before_it_can(
        pruner: str) -> None:
    study = _study_with_light_runs(make_pruner(spec_for(20, pruner)))
    for _ in range(6):  # several, since Hyperband puts trials in brackets by their number
        first = _first_pruned_epoch(study, HEAVY)
        assert first is None, f"{pruner} stopped it after epoch {first}"


def test_the_trend_rule_stops_a_levelled_off_trial_right_after_its_warm_up() -> None:
    """Sparing slow starters must not mean sparing everything: a trial stuck at a bad loss
    is stopped after 2 epochs, where the median rule with its longer warm-up waits for 6."""
    stuck = [2.3, 2.29, 2.29, 2.29, 2.29, 2.29] + [2.29] * 14
    trend = _study_with_light_trials(make_pruner(spec_for(20, "trend")), LIGHT)
    assert _first_pruned_epoch(trend, stuck) == 2
    median = _study_with_light_trials(make_pruner(spec_for(20, "median")), LIGHT)
    assert _first_pruned_epoch(median, stuck) == 6


def test_the_trend_rule_stops_a_trial_levelling_off_at_a_bad_loss_once_its_gains_shrink(
        ) -> None:
    """Still improving, but by less each epoch, towards a loss worse than the median trial's
    best: stopped after epoch 3, once two shrinking gains are seen. A straight-line projection
    of the last gains would have let it train until epoch 7 or later."""
    levelling = [1.0, 0.6, 0.45, 0.42, 0.41, 0.405] + [0.40] * 14
    trend = _study_with_light_trials(make_pruner(spec_for(20, "trend")), LIGHT)
    assert _first_pruned_epoch(trend, levelling) == 3


@pytest.mark.parametrize("pruner", ["median", "trend", "percentile", "patient", "hyperband",
                                    "successive-halving"])
def test_every_pruner_stops_a_hopeless_trial_but_never_within_the_warm_up(pruner: str) -> None:
    spec = spec_for(20, pruner)
    warmup = warmup_epochs(spec)
    hopeless = [5.0 + 0.01 * epoch for epoch in range(20)]  # worse each epoch: even "patient"
    study = _study_with_light_runs(make_pruner(spec))
    for _ in range(6):  # several, since Hyperband puts trials in brackets by their number
        first = _first_pruned_epoch(study, hopeless)
        assert first is not None, f"{pruner} let a hopeless trial train all its epochs"
        assert first > warmup, f"{pruner} stopped it after epoch {first}, in its warm-up"


def test_warm_up_scales_with_the_epochs_and_can_be_set() -> None:
    assert [warmup_epochs(spec_for(e)) for e in (2, 4, 8, 15, 20, 60)] == [1, 2, 2, 4, 5, 15]
    assert warmup_epochs(spec_for(20, pruner_warmup=2)) == 2


def test_the_warm_up_counts_epochs_as_a_plain_optuna_script_does() -> None:
    """``pruner_warmup = 2``: the earliest prune is after 3 epochs, as ``n_warmup_steps=2``
    in a script with optuna-integration's KerasPruningCallback (steps from 0)."""
    hopeless = [5.0] * 20
    ours = _study_with_light_trials(make_pruner(spec_for(20, pruner_warmup=2)), LIGHT)
    assert _first_pruned_epoch(ours, hopeless) == 3
    plain = _study_with_light_trials(
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2), LIGHT)
    trial = plain.ask()
    for step, value in enumerate(hopeless):  # KerasPruningCallback reports epoch e as step e-1
        trial.report(value, step)
        if trial.should_prune():
            assert step + 1 == 3
            break
    else:
        pytest.fail("never pruned")


def test_pruning_starts_after_three_completed_trials() -> None:
    """Three completed trials are company enough; the warm-up is what spares slow starters."""
    hopeless = [5.0] * 20
    assert _first_pruned_epoch(
        _study_with_light_trials(make_pruner(spec_for(20)), LIGHT, n=3), hopeless) == 6
    assert _first_pruned_epoch(
        _study_with_light_trials(make_pruner(spec_for(20)), LIGHT, n=2), hopeless) is None


@pytest.mark.parametrize(("budget", "startup"), [
    ({"n_trials": 24}, 6),  # a quarter of the trials
    ({"n_trials": 100}, 10),  # at most Optuna's 10
    ({"n_trials": 8}, 5),  # at least one more than the 4 knobs
    ({"epoch_budget": 150}, 5),  # 20 trials at half a full trial each
    ({"epoch_budget": 1200}, 10),
    ({"time_budget": "8h"}, 10)])  # unknown: Optuna's 10
def test_tpe_samples_at_random_for_a_quarter_of_what_the_budget_buys(
        budget: dict, startup: int) -> None:
    from tuner.study import make_sampler

    spec = parse_spec({"study": {"name": "s", **budget}, "model": {"epochs": 15},
                       "search": {"dropout": [0.0, 0.5], "l2": [1e-6, 1e-2],
                                  "augment": [0.0, 0.5], "learning_rate": [1e-4, 1e-2]}})
    assert make_sampler(spec)._n_startup_trials == startup
