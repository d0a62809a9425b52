"""Pruners: stop bad trials early without biasing the search against regularization.

Strongly regularized models (heavy L2, dropout or augmentation) learn more slowly at first. A
pruner that compares every trial with the others at the same early epoch stops exactly those,
which biases the search against the knobs it tunes. Two defences, both here: a warm-up counted
in epochs that scales with the study's (:func:`warmup_epochs`), and the ``trend`` rule
(:class:`TrendPruner`), which spares a trial that is still improving fast enough to catch up.

tuner reports epoch ``e`` as step ``e`` (1-based, as the dashboard shows it). Optuna may prune
from step ``n_warmup_steps`` on, hence ``warm-up + 1`` below: a warm-up of 2 prunes after 3
epochs at the earliest, as ``n_warmup_steps=2`` does in a plain Optuna script with
``KerasPruningCallback`` (which counts epochs from 0).
"""

from __future__ import annotations

import math
import statistics

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.spec import StudySpec

# Completed trials before any pruning. Three, not Optuna's five: the warm-up is what spares
# slow starters, and in a study of a dozen trials (a small epoch budget) two more unpruned
# trials are a sixth of it (benchmarks/RESULTS.md, section 4).
STARTUP_TRIALS = 3


def warmup_epochs(spec: StudySpec) -> int:
    """Epochs every trial trains before a pruner may stop it.

    ``[study] pruner_warmup``, else a quarter of ``[model] epochs`` (at least 2): strongly
    regularized models (heavy L2, dropout or augmentation) learn more slowly at first, and a
    pruner that stops slow starters biases the search against the very knobs it tunes.
    """
    if spec.pruner_warmup is not None:
        return min(spec.pruner_warmup, spec.model.epochs - 1)
    if spec.pruner == "trend":  # it spares improving trials itself: a short warm-up will do
        return max(0, min(1, spec.model.epochs - 1))
    return max(0, min(max(2, math.ceil(spec.model.epochs / 4)), spec.model.epochs - 1))


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's pruner; no trial is stopped before it trained :func:`warmup_epochs` + 1."""
    first = warmup_epochs(spec) + 1  # the first epoch at whose end a trial may be stopped
    if spec.pruner == "trend":
        return TrendPruner(first, spec.model.epochs, STARTUP_TRIALS)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS,
                                           n_warmup_steps=first)
    if spec.pruner == "percentile":  # stricter: only the best quarter at each epoch goes on
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=STARTUP_TRIALS,
                                               n_warmup_steps=first)
    if spec.pruner == "patient":  # the median rule, but never while the trial still improves
        return optuna.pruners.PatientPruner(
            optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=first),
            patience=2)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first,
                                              max_resource=spec.model.epochs,
                                              reduction_factor=3)
    if spec.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    return optuna.pruners.NopPruner()


class TrendPruner(optuna.pruners.BasePruner):
    """The median rule, except for trials that could still catch up.

    A trial is stopped at the end of epoch ``e`` (from ``first_epoch`` on) when the best value
    it reached so far is worse than the median of the completed trials at epoch ``e``, *and*
    even its projected future cannot reach the median completed trial's best value. The
    projection assumes that each epoch's improvement shrinks by the ratio the last two showed
    (learning curves flatten geometrically), at most ``max_ratio``, and the generous
    ``max_ratio`` while only one improvement is known. A slow starter still learning fast (its
    improvements not shrinking) is spared; one that levels off at a bad loss is stopped as
    soon as its improvements shrink, a few epochs after the warm-up, not at the end: a
    straight-line projection (each epoch gaining what the last did) spares nearly every trial
    early on, when every curve still falls fast.
    """

    def __init__(self, first_epoch: int, max_epochs: int,
                 n_startup_trials: int = STARTUP_TRIALS, max_ratio: float = 0.9) -> None:
        self.first_epoch, self.max_epochs = first_epoch, max_epochs
        self.n_startup_trials, self.max_ratio = n_startup_trials, max_ratio

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.first_epoch:
            return False
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(completed) < self.n_startup_trials:
            return False
        values = [v for _, v in sorted(trial.intermediate_values.items())]
        if any(math.isnan(v) for v in values):
            return True
        at_step = [t.intermediate_values[step] for t in completed
                   if step in t.intermediate_values]
        finals = [t.value for t in completed if t.value is not None]
        if not at_step or not finals:
            return False
        best = min(values)
        if best <= statistics.median(at_step):
            return False
        return best - self._still_to_gain(values, step) > statistics.median(finals)

    def _still_to_gain(self, values: list[float], step: int) -> float:
        """The improvement the rest of the epochs may bring: the latest gain, shrinking by
        the ratio of the last two gains in every epoch left (a geometric series)."""
        gains = [max(0.0, a - b) for a, b in zip(values, values[1:], strict=False)]
        if not gains or gains[-1] <= 0.0:
            return 0.0
        ratio = self.max_ratio
        if len(gains) >= 2 and gains[-2] > 0.0:
            ratio = min(self.max_ratio, gains[-1] / gains[-2])
        left = max(0, self.max_epochs - step)
        return gains[-1] * ratio * (1 - ratio ** left) / (1 - ratio)
