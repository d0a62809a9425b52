"""What the CLI prints about trials and studies: progress lines, the best trial, JSON.

No TensorFlow here: ``tuner best`` must answer at once.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner import attrs
from tuner.errors import RuntimeFailure
from tuner.spec import StudySpec
from tuner.worker import Outcome


def format_outcome(outcome: Outcome, epochs: int) -> str:
    """One progress line per finished trial."""
    run = f"{outcome.epochs_run:>3}/{epochs}" if outcome.epochs_run is not None else "  -/" + \
        str(epochs)
    value = f"{outcome.value:.4f}" if outcome.value is not None else "   -  "
    best = (f"{outcome.best_value:.4f} (#{outcome.best_number})"
            if outcome.best_value is not None else "-")
    line = (f"trial {outcome.number:>4}  {outcome.state:<8}  epochs {run}  val_loss {value}  "
            f"best {best}  {outcome.seconds:5.1f}s")
    if outcome.reason:
        line += f"  {outcome.reason}"
    return line


def best_summary(study: optuna.Study, spec: StudySpec) -> dict[str, Any]:
    """The best trial as a stable, JSON-ready dict (the shape ``tuner best --json`` prints).

    Validation chooses; test figures (when the data has a test split) are reported beside it,
    with the median test loss of the completed trials, so a winner that only got lucky on the
    validation split shows. ``confirmed`` ranks the configurations of a confirm step.
    """
    try:
        best = study.best_trial
    except ValueError:
        raise RuntimeFailure(f"study {study.study_name!r} has no completed trial yet; "
                             "wait for a worker to finish one (see `tuner status`)") from None
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
    }


def _confirmed(study: optuna.Study) -> dict[str, Any] | None:
    from tuner.confirm import ranking

    configs = ranking(study)
    if configs is None:
        return None
    request = study.user_attrs[attrs.CONFIRM]
    ranked = [c for c in configs if c.val_losses]
    return {"top": request["top"], "seeds": request["seeds"],
            "pending": sum(c.pending for c in configs),
            "winner": ranked[0].as_dict() if ranked else None,
            "configs": [c.as_dict() for c in configs]}


def format_best(summary: dict[str, Any]) -> str:
    def num(v: Any, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        f"Best trial of study {summary['study']!r}: #{summary['trial']}",
        f"  val_loss       {num(summary['val_loss'])}   validation cross-entropy, "
        "no L2 penalty",
        f"  val_accuracy   {num(summary['val_accuracy'])}",
        f"  train_loss     {num(summary['train_loss'])}   the same, on training data "
        "(no dropout, no augmentation)",
        f"  gap            {num(summary['gap'])}   val_loss - train_loss at the best epoch",
    ]
    if summary["test_loss"] is not None:
        lines += [f"  test_loss      {num(summary['test_loss'])}   on the test split, never "
                  "used to choose",
                  f"  test_accuracy  {num(summary['test_accuracy'])}"]
    lines += [f"  best epoch     {summary['best_epoch']} of {summary['epochs_run']} run "
              f"(max {summary['max_epochs']})",
              "  parameters"]
    for name, value in summary["params"].items():
        lines.append(f"    {name:<22} {_param(value)}")
    if not summary["params"]:
        lines.append("    (none: every knob is fixed in the study file)")
    if summary["test_worse_than_median"]:
        lines.append(f"Note: its test loss {num(summary['test_loss'])} is worse than the median "
                     f"completed trial's ({num(summary['test_loss_median_of_completed'])}): its "
                     "low validation loss is partly luck. `tuner confirm` retrains the best "
                     "configurations with new seeds.")
    confirmed = summary.get("confirmed")
    if confirmed:
        lines += ["", _format_confirmed(confirmed, num)]
    return "\n".join(lines)


def _format_confirmed(confirmed: dict[str, Any], num: Any) -> str:
    lines = [f"Confirm step: the top {confirmed['top']} configurations, each retrained with "
             f"{confirmed['seeds']} new seed{'s' if confirmed['seeds'] > 1 else ''}"
             + (f" ({confirmed['pending']} runs still to finish)" if confirmed["pending"]
                else "")]
    rows = [["config", "runs", "val_loss mean ± std", "test_loss mean", "trials"]]
    for c in confirmed["configs"]:
        spread = (f"{num(c['val_loss_mean'])} ± {num(c['val_loss_std'])}" if c["runs"]
                  else "-")
        rows.append([f"#{c['trial']}", str(len(c["runs"])), spread, num(c["test_loss_mean"]),
                     ", ".join(map(str, c["runs"]))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    winner = confirmed["winner"]
    if winner is not None:
        lines.append(f"Confirmed winner: the configuration of trial #{winner['trial']}, val_loss "
                     f"{num(winner['val_loss_mean'])} ± {num(winner['val_loss_std'])} over "
                     f"{len(winner['runs'])} runs")
    return "\n".join(lines)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
    return str(value)
