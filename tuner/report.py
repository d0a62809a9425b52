"""What the CLI prints about trials and studies: progress lines, the best trial, JSON.

No TensorFlow here: ``tuner best`` must answer at once.
"""

from __future__ import annotations

import json
from typing import Any

import optuna

from tuner.errors import RuntimeFailure
from tuner.spec import StudySpec
from tuner.worker import Outcome

RESULT_ATTRS = ("val_accuracy", "train_loss", "gap", "best_epoch", "epochs_run",
                "keras_val_loss", "pruned_at", "host", "gpu", "seconds")


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
    """The best trial as a stable, JSON-ready dict (the shape ``tuner best --json`` prints)."""
    try:
        best = study.best_trial
    except ValueError:
        raise RuntimeFailure(f"study {study.study_name!r} has no completed trial yet; "
                             "wait for a worker to finish one (see `tuner status`)") from None
    attrs = best.user_attrs
    return {
        "study": study.study_name,
        "trial": best.number,
        "val_loss": best.value,
        "val_accuracy": attrs.get("val_accuracy"),
        "train_loss": attrs.get("train_loss"),
        "gap": attrs.get("gap"),
        "best_epoch": attrs.get("best_epoch"),
        "epochs_run": attrs.get("epochs_run"),
        "max_epochs": spec.model.epochs,
        "params": dict(best.params),
        "keras_val_loss": attrs.get("keras_val_loss"),
        "host": attrs.get("host"),
        "gpu": attrs.get("gpu"),
        "seconds": attrs.get("seconds"),
        "model_artifact": attrs.get("model_artifact"),
    }


def format_best(summary: dict[str, Any]) -> str:
    def num(v: Any, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        f"Best trial of study {summary['study']!r}: #{summary['trial']}",
        f"  val_loss       {num(summary['val_loss'])}   validation cross-entropy, "
        "no L2 penalty",
        f"  val_accuracy   {num(summary['val_accuracy'])}",
        f"  train_loss     {num(summary['train_loss'])}",
        f"  gap            {num(summary['gap'])}   val_loss - train_loss at the best epoch",
        f"  best epoch     {summary['best_epoch']} of {summary['epochs_run']} run "
        f"(max {summary['max_epochs']})",
        "  parameters",
    ]
    for name, value in summary["params"].items():
        lines.append(f"    {name:<22} {_param(value)}")
    if not summary["params"]:
        lines.append("    (none: every knob is fixed in the study file)")
    return "\n".join(lines)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
    return str(value)
