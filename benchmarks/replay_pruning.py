"""Pruning rules replayed on recorded learning curves: many rules, seeds and study sizes for the
price of the unpruned searches ``bench_pruning.py`` already ran.

``bench_pruning.py`` keeps every trial's validation curve. An unpruned search holds the whole
curve of every configuration its sampler proposed, so a pruning rule can be replayed on it
offline: the trials are told to a fresh in-memory study in their order, each epoch is reported
to tuner's own pruner (``tuner.pruning.make_pruner``, the code a worker runs), and a trial the
pruner stops keeps only the epochs it trained. Optuna's WilcoxonPruner is replayed too, as a
plain Optuna script would use it with epochs as its steps: it tests whether a trial's curve is
worse than the best trial's, epoch by epoch (paired). It was made for scores on the same
*instances* (folds, problems), and a curve's epochs are not exchangeable instances; the replay
shows what it gives anyway. So is a rule of the replay's own: the median rule with a warm-up
that grows with each trial's augmentation strength. Per rule: the epochs all trials trained,
and the best validation loss and the test loss of the trial the search would pick (its best
completed trial), each against the unpruned search, for the first 12, 24 and 48 trials.

What a replay cannot show: a real pruned search tells its sampler other results, so from the
first pruned trial on it proposes other configurations. The replay keeps the unpruned order.
It ranks rules; ``bench_pruning.py`` measures the ones worth running.

    python benchmarks/replay_pruning.py --runs benchmarks/out/prune-*/pruning.json
"""

from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import parse_args, table, write_result
from _datasets import study_file

# (label, pruner, pruner_warmup, startup trials); None: tuner's default
RULES = [("median (default)", "median", None, None),
         ("median, 5 startup trials (the default until 2026-12)", "median", None, 5),
         ("median, 2 startup trials", "median", None, 2),
         ("median, warm-up 1", "median", 1, None),
         ("median, warm-up 1, 5 startup trials", "median", 1, 5),
         ("trend (warm-up 1)", "trend", None, None),
         ("percentile 25, warm-up 1", "percentile", 1, None),
         ("percentile 25, default warm-up", "percentile", None, None),
         ("patient median", "patient", None, None),
         ("hyperband, warm-up 0", "hyperband", 0, None),
         ("successive halving, warm-up 1", "successive-halving", 1, None),
         ("wilcoxon p 0.1, default warm-up", "wilcoxon:0.1", None, None),
         ("wilcoxon p 0.1, warm-up 1", "wilcoxon:0.1", 1, None),
         ("wilcoxon p 0.05, default warm-up", "wilcoxon:0.05", None, None),
         ("median, warm-up by augmentation (1 to default)", "augment-warmup", None, None)]
SIZES = (12, 24, 48)


def _rule(kind: str, spec: Any) -> Any:
    """tuner's pruner for ``kind``, Optuna's WilcoxonPruner (``wilcoxon:P``) as a plain
    Optuna script would use it, from the same first epoch as tuner's rules, or the median rule
    with a warm-up scaled by each trial's augmentation (``augment-warmup``)."""
    import optuna

    from tuner import pruning

    if kind == "augment-warmup":
        return _augment_warmup(spec)
    if not kind.startswith("wilcoxon:"):
        return pruning.make_pruner(replace(spec))
    return optuna.pruners.WilcoxonPruner(p_threshold=float(kind.split(":")[1]),
                                         n_startup_steps=pruning.warmup_epochs(spec) + 1)


def _augment_warmup(spec: Any) -> Any:
    """The median rule, with a warm-up that grows with the trial's augmentation strength: 1
    epoch without augmentation, tuner's default warm-up at the top of the range. Augmented
    configurations start slowly (section 4b of RESULTS.md), the others need no long warm-up.
    The strength comes from the user attribute ``augment`` that :func:`replay` sets."""
    import optuna

    from tuner import pruning

    median = optuna.pruners.MedianPruner(n_startup_trials=pruning.STARTUP_TRIALS,
                                         n_warmup_steps=1)
    most = pruning.warmup_epochs(spec)
    top = spec.search.augment.high if spec.search.augment else 1.0  # none: 1 epoch each

    class AugmentWarmup(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            warmup = max(1, round(most * trial.user_attrs.get("augment", 0.0) / top))
            return (trial.last_step or 0) >= warmup + 1 and median.prune(study, trial)

    return AugmentWarmup()


def replay(curves: list[dict[str, Any]], pruner: Any, max_epochs: int) -> dict[str, float]:
    """Tell ``curves`` (in order) to an in-memory study with ``pruner``; what it trained and
    picked. As in a trial, the pruner is not asked at the last epoch (``max_epochs``)."""
    import optuna

    # A fixed name: Hyperband puts a trial in its bracket by a hash of the study's name.
    study = optuna.create_study(study_name="replay", direction="minimize", pruner=pruner)
    epochs = 0
    kept: list[tuple[float, float | None]] = []  # (best val_loss, test loss) of completed
    for c in curves:
        trial = study.ask()
        trial.set_user_attr("augment", c.get("params", {}).get("augment", 0.0))
        pruned = False
        for step, value in enumerate(c["val_loss"], start=1):
            trial.report(value, step)
            epochs += 1
            if step < max_epochs and trial.should_prune():
                pruned = True
                break
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, min(c["val_loss"]))
            kept.append((min(c["val_loss"]), c["test_loss"]))
    best = min(kept, key=lambda k: k[0])
    return {"epochs": epochs, "best_val_loss": best[0], "test_loss": best[1],
            "pruned": len(curves) - len(kept)}


def main() -> None:
    args = parse_args(__doc__, lambda p: p.add_argument(
        "--runs", nargs="+", type=Path,
        help="pruning.json files of bench_pruning runs with a 'none' setting "
             "(default: the one in --out)"))
    args.runs = args.runs or [args.out / "pruning.json"]
    import optuna

    from tuner import pruning
    from tuner.spec import PRUNERS, load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    # A best trial that early stopping ended sooner has fewer epochs: Wilcoxon pairs the rest.
    warnings.filterwarnings("ignore", "WilcoxonPruner finds steps existing in the current")
    from _datasets import datasets

    known = {d.name: d for d in datasets(args.out / "data")}
    searches = [r for path in args.runs for r in json.loads(path.read_text())["runs"]
                if r["setting"] == "none" and r.get("curves")]
    if args.quick:
        searches = searches[:1]
    results = []
    for search in searches:
        ds = known[search["dataset"]]
        curves = sorted(search["curves"], key=lambda c: c["number"])
        for size in [s for s in SIZES if s <= len(curves)] or [len(curves)]:
            base = replay(curves[:size], optuna.pruners.NopPruner(), 0)
            for label, kind, warmup, startup in RULES:
                spec = load_spec(study_file(
                    args.out / "replay", "replay", ds, seed=0, n_trials=size,
                    pruner=kind if kind in PRUNERS else "median",
                    pruner_warmup=warmup))
                default = pruning.STARTUP_TRIALS
                pruning.STARTUP_TRIALS = default if startup is None else startup
                try:
                    got = replay(curves[:size], _rule(kind, spec), spec.model.epochs)
                finally:
                    pruning.STARTUP_TRIALS = default
                results.append({
                    "dataset": ds.name, "seed": search["seed"], "trials": size, "rule": label,
                    **got, "epoch_saving": base["epochs"] / got["epochs"],
                    "best_val_loss_vs_none": got["best_val_loss"] / base["best_val_loss"],
                    "test_loss_vs_none": got["test_loss"] / base["test_loss"]})
    rows = []
    for ds in dict.fromkeys(r["dataset"] for r in results):
        for size in sorted({r["trials"] for r in results}):
            for label, *_ in RULES:
                mine = [r for r in results if (r["dataset"], r["trials"], r["rule"])
                        == (ds, size, label)]
                if not mine:
                    continue
                saving = statistics.fmean(r["epoch_saving"] for r in mine)
                val = statistics.fmean(r["best_val_loss_vs_none"] for r in mine)
                test = statistics.fmean(r["test_loss_vs_none"] for r in mine)
                rows.append((ds, size, label, len(mine), saving, val, test,
                             sum(r["best_val_loss_vs_none"] > 1.02 for r in mine),
                             "met" if saving >= 3 and val <= 1.02 else "missed"))
    t1 = table(["dataset", "trials", "rule", "searches", "epochs saved x",
                "best val_loss / none", "test loss of pick / none",
                "searches that lost > 2 %", "goal >=3x, <=1.02"], rows)
    met = [label for label, *_ in RULES if all(
        row[4] >= 3 and row[5] <= 1.02 for row in rows if row[2] == label)]
    write_result(args, "replay_pruning", {
        "runs": [str(p) for p in args.runs], "sizes": sorted({r["trials"] for r in results}),
        "rules": [r[0] for r in RULES], "results": results,
        "rules_meeting_goal_everywhere": met}, [t1])


if __name__ == "__main__":
    main()
