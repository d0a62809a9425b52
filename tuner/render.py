"""Every line and JSON object a user sees, in one place.

The commands gather facts (:mod:`tuner.inspect`, :mod:`tuner.worker`, ...) and hand them here
to be worded; nothing here touches a database or TensorFlow. Numbers are written by
:func:`number` alone, tables by :func:`align` alone, JSON by :func:`to_json` alone.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shlex
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuner.confirm import Queued
    from tuner.inspect import StudyStatus
    from tuner.worker import Outcome

STATES = ("running", "complete", "pruned", "failed", "waiting")
_LOSSES = ("val_loss", "val_accuracy", "gap", "train_loss", "test_loss", "test_accuracy")
_OPTIONAL_COLUMNS = ("test_loss", "test_accuracy", "confirms", "fail_reason")
_LONG_COLUMNS = ("train_loss", "best_epoch", "started_at", "ended_at")  # in csv and json only


# --- the pieces --------------------------------------------------------------------------------


def to_json(value: Any) -> str:
    """Indented, keys sorted: stable for scripts and diffs."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def number(value: float | None, places: int = 4) -> str:
    """``-`` for nothing; 3 significant digits for very small or large values (a learning rate,
    an L2 strength); else ``places`` decimals."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e4:
        return f"{value:.3g}"
    return f"{value:.{places}f}"


def _loss(value: float | None) -> str:
    """A loss or an accuracy: always 4 decimals, so that a column of them lines up."""
    return "-" if value is None else f"{value:.4f}".replace("-0.0000", "0.0000")


def count(n: int, noun: str) -> str:
    """``1 trial``, ``3 trials``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def duration(seconds: float) -> str:
    """``90s``, ``30m``, ``8h`` as a study file writes them; ``41s``, ``4m 10s``, ``2h 05m``
    for ages and running times."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s" if seconds >= 1 else f"{seconds:g}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600:02d}h"


def align(rows: list[list[str]], right: set[int] | None = None) -> str:
    """Columns padded to their widest cell; columns in ``right`` aligned right."""
    right = right or set()
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
        for r in rows)


# --- run, create, worker -----------------------------------------------------------------------


def study_created(name: str, url: str, budget: str, sampler: str, pruner: str) -> str:
    return f"Created study {name!r} in {url} ({budget}, sampler {sampler}, pruner {pruner})"


def study_exists(name: str, url: str, progress: str, resuming: bool) -> str:
    return f"Study {name!r} exists in {url}: {progress}" + (", resuming" if resuming else "")


def settings_changed(changes: list[str]) -> str:
    return (f"Changed: {', '.join(changes)}; workers already running follow it from their "
            "next trial.")


def nothing_to_run(reason: str) -> str:
    return (f"Nothing left to run: the {reason}. Raise the budget in the study file and run "
            "`tuner create` again to run more.")


def start_workers(name: str, storage_flags: str) -> str:
    return (f"Start workers with: tuner worker --study {shlex.quote(name)} {storage_flags} "
            "--gpus all")


def outcome(o: Outcome, epochs: int) -> str:
    """One progress line per finished trial."""
    run = f"{o.epochs_run:>3}/{epochs}" if o.epochs_run is not None else f"  -/{epochs}"
    value = number(o.value) if o.value is not None else "   -  "
    best = f"{number(o.best_value)} (#{o.best_number})" if o.best_value is not None else "-"
    line = (f"trial {o.number:>4}  {o.state:<8}  epochs {run}  val_loss {value}  "
            f"best {best}  {o.seconds:5.1f}s")
    return f"{line}  {o.reason}" if o.reason else line


def worker_started(host: str, pid: int, study: str, labels: list[str]) -> str:
    return (f"Worker on {host} (pid {pid}): study {study!r}, {len(labels)} process"
            f"{'es' if len(labels) > 1 else ''} on {', '.join(labels)}")


def worker_stopping(signal_name: str) -> str:
    return f"Received {signal_name}: the running trials are given back, stopping"


def worker_stopped(killed: int = 0) -> str:
    if not killed:
        return "Stopped: the running trials were given back; start the worker again to resume."
    which = "1 process was" if killed == 1 else f"{killed} processes were"
    return (f"Stopped: {which} killed before giving a running trial back; such a trial is "
            "queued again once its heartbeat is missed (the grace period). Start the worker "
            "again to resume.")


def worker_done() -> str:
    return "Done: every process of this worker has finished."


def worker_child_done(trials_run: int, stopped_because: str) -> str:
    return f"done after {count(trials_run, 'trial')}: {stopped_because}"


def waiting() -> str:
    return ("waiting: every trial left in the budget is running, and one may still be given "
            "back (Ctrl-C stops waiting)")


def no_gpu_seen(visible: str, tensorflow_version: str) -> str:
    return (f"warning: TensorFlow sees no GPU, though CUDA_VISIBLE_DEVICES={visible}: trials "
            "train on the CPU. On a GPU node, check the index against `nvidia-smi -L`, and "
            "install TensorFlow's CUDA libraries: "
            f"pip install 'tensorflow[and-cuda]=={tensorflow_version}'")


def no_tensorflow(error: str, python: str) -> str:
    return (f"cannot import TensorFlow ({error}); trials train with it. Install tuner with its "
            f"dependencies into the Python that runs them ({python}): pip install . in a "
            "checkout of tuner")


def run_done(stopped_because: str) -> str:
    return f"Done: {stopped_because}."


def run_interrupted() -> str:
    return "Interrupted: the running trial was given back; run the same command to resume."


def confirm_queued(study: str, q: Queued, asked: tuple[int, int],
                   budgets: tuple[bool, int | None, bool] = (True, None, False),
                   storage_flags: str = "") -> str:
    """What ``tuner confirm`` did; ``asked``: its ``--top`` and ``--seeds``; ``budgets``:
    whether the study sets ``n_trials``, the epochs of a run if it sets an epoch budget, and
    whether it sets a time budget (how each budget makes room: :mod:`tuner.budget`)."""
    configs = ", ".join(f"#{n}" for n in q.configs)
    seeds = f"{count(q.seeds, 'new seed')}{' each' if len(q.configs) > 1 else ''}"
    if not q.new:
        unused = ""
        if asked != (q.top, q.seeds):
            unused = (f" --top {asked[0]} --seeds {asked[1]} were not used: a study is "
                      "confirmed once (give the search a new study name to confirm afresh).")
        runs_of = "trial" if len(q.configs) == 1 else "trials"
        return (f"Study {study!r} was already confirmed: {count(q.trials, 'run')} of "
                f"{runs_of} {configs} were queued before ({count(q.seeds, 'seed')}"
                f"{' each' if len(q.configs) > 1 else ''}); `tuner best` ranks them.{unused}")
    top = "the best configuration (trial" if len(q.configs) == 1 else \
        f"the top {len(q.configs)} configurations (trials"
    trials, epochs, timed = budgets
    grew = [count(q.added, "trial")] if trials else []
    grew += [f"{q.added * epochs} epochs"] if epochs is not None else []
    room = f" The study's budget grew by {' and '.join(grew)}." if grew else ""
    if timed:
        room += " They start even once its time budget is spent."
    return (f"Queued {count(q.added, 'run')} in study {study!r}: {top} {configs}), {seeds}."
            f"{room} Workers run them next (start one with "
            f"`{worker_command(study, storage_flags)}` if none is running), then `tuner best` "
            "ranks them.")


# --- best --------------------------------------------------------------------------------------


def best(summary: dict[str, Any]) -> str:
    """``tuner best``: the winner, its losses, test figures beside validation, its knobs."""
    s = summary
    lines = [
        f"Best trial of study {s['study']!r}: #{s['trial']}",
        f"  val_loss       {_loss(s['val_loss'])}   validation cross-entropy, no L2 penalty",
        f"  val_accuracy   {_loss(s['val_accuracy'])}",
        f"  train_loss     {_loss(s['train_loss'])}   the same, on training data "
        "(no dropout, no augmentation)",
        f"  gap            {_loss(s['gap'])}   val_loss - train_loss at the best epoch",
    ]
    if s["test_loss"] is not None:
        lines += [f"  test_loss      {_loss(s['test_loss'])}   on the test split, never used "
                  "to choose",
                  f"  test_accuracy  {_loss(s['test_accuracy'])}"]
    lines += [f"  best epoch     {s['best_epoch']} of {s['epochs_run']} run "
              f"(max {s['max_epochs']})"]
    lines += _curve_lines(s.get("curve"), s.get("val_loss_turned_up_at"))
    lines.append("  parameters")
    lines += [f"    {name:<22} {_param(value)}" for name, value in s["params"].items()]
    if not s["params"]:
        lines.append("    (none: every knob is fixed in the study file)")
    if s["test_worse_than_median"]:
        lines.append(f"Note: its test loss {_loss(s['test_loss'])} is worse than the median "
                     f"completed trial's ({number(s['test_loss_median_of_completed'])}): its "
                     "low validation loss is partly luck. `tuner confirm` retrains the best "
                     "configurations with new seeds.")
    if s.get("confirmed"):
        lines += ["", _confirmed(s["confirmed"])]
    return "\n".join(lines)


def _curve_lines(curve: dict[str, list[float]] | None, turned_up: int | None) -> list[str]:
    """The winner's learning curves as sparklines on one scale, so the gap shows as the
    distance between the two lines, and the epoch where validation loss turned up."""
    val = (curve or {}).get("val_loss") or []
    train = (curve or {}).get("train_loss") or []
    if not val:
        return []
    finite = [v for v in val + train if v == v and abs(v) != float("inf")]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    # first → last epoch; the lowest is the val_loss line above (the curve is stored rounded,
    # so printing its minimum again could differ from it in the last digit)
    lines = [f"  val_loss       {sparkline(val, low, high)}  {number(val[0])} → "
             f"{number(val[-1])}"]
    if train:
        lines.append(f"  train_loss     {sparkline(train, low, high)}  {number(train[0])} → "
                     f"{number(train[-1])}")
    if turned_up is None:
        lines.append(f"  turned up      never: val_loss was still falling at epoch {len(val)} "
                     "(more epochs might help)")
    else:
        lines.append(f"  turned up      at epoch {turned_up}: val_loss rose after its lowest "
                     f"(epoch {turned_up - 1})")
    return lines


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], low: float, high: float, width: int = 40) -> str:
    """``values`` as block characters between ``low`` and ``high``; more than ``width``
    values are averaged in ``width`` bins."""
    if len(values) > width:
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:], strict=False)
                  if b > a]
    span = high - low
    out = []
    for v in values:
        if v != v or abs(v) == float("inf"):
            out.append(" ")
            continue
        level = 0 if span <= 0 else int((v - low) / span * (len(_BARS) - 1) + 0.5)
        out.append(_BARS[min(len(_BARS) - 1, max(0, level))])
    return "".join(out)


def exported(path: str, trial: int) -> str:
    return f"Exported the best-epoch model of trial #{trial} to {path}"


def _confirmed(c: dict[str, Any]) -> str:
    seeds = f"{c['seeds']} new seed{'s' if c['seeds'] > 1 else ''}"
    pending = f" ({count(c['pending'], 'run')} still to finish)" if c["pending"] else ""
    rows = [["config", "runs", "val_loss mean ± std", "test_loss mean", "trials"]]
    for config in c["configs"]:
        spread = _spread(config)
        rows.append([f"#{config['trial']}", str(len(config["runs"])), spread,
                     number(config["test_loss_mean"]), ", ".join(map(str, config["runs"]))])
    top = ("the best configuration" if len(c["configs"]) == 1
           else f"the top {len(c['configs'])} configurations")  # fewer than asked, if so
    lines = [f"Confirm step: {top}, each retrained with {seeds}{pending}"]
    lines += ["  " + row for row in align(rows).splitlines()]
    winner = c["winner"]
    if winner is not None:
        lines.append(f"Confirmed winner: the configuration of trial #{winner['trial']}, "
                     f"val_loss {_spread(winner)} over {count(len(winner['runs']), 'run')}")
    return "\n".join(lines)


def _spread(config: dict[str, Any]) -> str:
    """``mean ± std`` of a configuration's runs; one run has no spread to show."""
    if not config["runs"]:
        return "-"
    mean = number(config["val_loss_mean"])
    return f"{mean} ± {number(config['val_loss_std'])}" if len(config["runs"]) > 1 else mean


def _param(value: Any) -> str:
    return number(value) if isinstance(value, float) else str(value)


# --- status ------------------------------------------------------------------------------------


def no_studies(url: str) -> str:
    return f"No studies in {url} yet: start one with `tuner run STUDY.toml`."


def status(s: StudyStatus, now: dt.datetime | None = None) -> str:
    """A study's status as a few aligned lines."""
    now = now or dt.datetime.now(dt.UTC)
    if s.n_trials is not None and s.epoch_budget is None and s.time_budget is None:
        budget = f"{count(s.n_trials, 'trial')} budget, {s.left} left"
    elif s.budget:
        budget = f"budget {s.budget}"
    else:
        budget = "no budget recorded"
    lines = [f"Study {s.study!r}: {budget}",
             "  trials   " + ", ".join(f"{s.states[k]} {k}" for k in STATES)]
    if s.best_value is None:
        lines.append("  best     - (no completed trial yet)")
    else:
        found = dt.datetime.fromisoformat(s.best_found_at) if s.best_found_at else None
        when = (f", found {found.astimezone().strftime('%Y-%m-%d %H:%M:%S')} "
                f"({duration((now - found).total_seconds())} ago)") if found else ""
        lines.append(f"  best     val_loss {number(s.best_value)} (trial #{s.best_trial}){when}")
    if s.running:
        rows = [["trial", "host", "gpu", "epoch", "epoch ended", "running", "heartbeat"]]
        for r in s.running:
            epoch = "-" if r.epoch is None else str(r.epoch)
            if r.max_epochs is not None:
                epoch += f"/{r.max_epochs}"
            rows.append([f"#{r.trial}", r.host or "-", r.gpu or "-", epoch,
                         "-" if r.last_epoch_age_s is None
                         else f"{duration(r.last_epoch_age_s)} ago",
                         "-" if r.running_s is None else duration(r.running_s),
                         "none yet" if r.heartbeat_age_s is None
                         else f"{duration(r.heartbeat_age_s)} ago"])
        table = align(rows).splitlines()
        lines.append("  running  " + table[0])
        lines.extend("           " + row for row in table[1:])
    return "\n".join(lines)


# --- trials ------------------------------------------------------------------------------------


def trials(rows: list[dict[str, Any]], fmt: str) -> str:
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
    for key in _OPTIONAL_COLUMNS:  # the table leaves out columns with nothing in them
        if all(r[key] is None for r in rows):
            keys.remove(key)
    for key in _LONG_COLUMNS:
        keys.remove(key)
    table = [keys] + [[_cell(k, r[k]) for k in keys] for r in rows]
    return align(table, right={i for i, k in enumerate(keys)
                               if k not in ("state", "host", "fail_reason")})


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "seconds":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}" if key in _LOSSES else number(value)
    return str(value)


# --- importance --------------------------------------------------------------------------------


def importance(report: dict[str, Any]) -> str:
    """Which knob mattered, then where the best trial sits in each range."""
    lines = []
    if report["importances"] is None:
        lines.append(f"Parameter importances: {report['note']}")
    elif not report["importances"]:
        lines.append("Parameter importances: every knob is fixed in the study file, so none "
                     "to weigh")
    else:
        lines.append(f"Parameter importances of study {report['study']!r} "
                     f"(fANOVA over {report['complete_trials']} completed trials)")
        width = max(len(k) for k in report["importances"]) if report["importances"] else 0
        for name, value in report["importances"].items():
            lines.append(f"  {name:<{width}}  {value:5.2f}  {'#' * int(round(value * 30))}")
    if report["best_trial"] is None:
        lines.append("No completed trial yet: nothing to say about the search ranges.")
        return "\n".join(lines)
    if not report["ranges"]:
        lines.append(f"Best trial #{report['best_trial']}: every knob is fixed in the study "
                     "file, so no range to widen.")
        return "\n".join(lines)
    lines.append(f"Best trial #{report['best_trial']}: where each value sits in its range "
                 "(0% = low edge, 100% = high edge)")
    rows = [[p["param"], number(p["value"], 3),
             f"[{number(p['low'], 3)}, {number(p['high'], 3)}]{' log' if p['log'] else ''}",
             f"{100 * p['position']:.0f}%", p["advice"] or "ok"] for p in report["ranges"]]
    if rows:
        lines.extend("  " + row for row in align(rows, right={1, 3}).splitlines())
    return "\n".join(lines)


# --- dashboard ---------------------------------------------------------------------------------


def dashboard_started(url: str, address: str, directories: list[str], host: str) -> str:
    lines = [f"optuna-dashboard for {url}: {address}",
             f"  saved models from {', '.join(directories)}"]
    if host not in ("127.0.0.1", "localhost", "::1"):
        lines.append(f"  listening on {host}: anyone who can reach this port can read and edit "
                     "the studies")
    lines.append("  Ctrl-C stops it.")
    return "\n".join(lines)


# --- figures: tuner plot, and the dashboard's study page ----------------------------------------

OBJECTIVE_NAME = "val_loss (cross-entropy, no L2 penalty)"
EPOCH_LABEL = "epoch"
LOSS_LABEL = "cross-entropy (no L2 penalty)"
VAL_LOSS_LABEL = "val_loss"
GAP_LABEL = "gap (val − train)"


def curves_title(n: int) -> str:
    trials = "trial" if n == 1 else f"{n} trials"
    return f"Best {trials}: training (dashed) vs validation loss, ★ best epoch"


def knobs_title(complete: int) -> str:
    return f"val_loss (top) and gap (bottom) per knob, {count(complete, 'trial')}, ★ best"


def curve_name(trial: int, kind: str) -> str:
    return f"#{trial} {kind}"


def best_epoch_name(trial: int) -> str:
    return f"#{trial} best epoch"


def best_epoch_hover() -> str:
    return "best epoch %{x}: val_loss %{y:.4f} (the model kept)"


def knob_series(gap: bool) -> str:
    return GAP_LABEL if gap else VAL_LOSS_LABEL


def best_trial_name(trial: int) -> str:
    return f"best trial #{trial}"


def plot_page_title(study: str) -> str:
    return f"Study {study!r}: training against validation loss"


def figure_summary(study: str, best_trial: int, best_value: float, gap: float | None,
                   complete: int) -> list[str]:
    """The lines above the figures in ``tuner plot``'s HTML page."""
    return [f"Best trial #{best_trial}: val_loss {number(best_value)}, gap {number(gap)} "
            "(val_loss − train_loss at its best epoch)",
            f"{count(complete, 'completed trial')}; "
            f"`tuner best --study {study}` for its parameters"]


NOTE_END = ("*Written by tuner whenever the figures are updated; what you write below this "
            "line is kept.*")


def study_note(best_trial: int, best_value: float, gap: float | None, complete: int,
               report: dict[str, Any], updated_at: float) -> str:
    """The study's note in optuna-dashboard (Markdown): the winner, its gap, range advice."""
    when = dt.datetime.fromtimestamp(updated_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"**Best trial #{best_trial}**: val_loss {number(best_value)} "
             "(cross-entropy, no L2 penalty), generalization gap "
             f"{number(gap)} (val_loss − train_loss at its best epoch), "
             f"out of {count(complete, 'completed trial')}.", ""]
    if report.get("importances"):
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in report["importances"].items())
        lines += [f"Importances (fANOVA): {ranked}.", ""]
    advice = [p for p in report.get("ranges", []) if p.get("advice")]
    if advice:
        lines.append("Search ranges (`tuner importance`):")
        lines += [f"- {p['param']} = {number(p['value'], 3)} in [{number(p['low'], 3)}, "
                  f"{number(p['high'], 3)}]: {p['advice']}" for p in advice]
    elif report.get("ranges"):
        lines.append("Search ranges (`tuner importance`): the best trial sits inside every "
                     "range; none needs widening.")
    lines += ["", f"Updated {when}.", "", "---", NOTE_END]
    return "\n".join(lines)


def plot_written(path: str, study: str, curves: int, complete: int) -> str:
    return (f"Wrote {path}: learning curves of the best {count(curves, 'trial')} and the "
            f"knobs of {count(complete, 'completed trial')} of study {study!r}")


def plot_bad_extension(path: str, extensions: tuple[str, ...]) -> str:
    return (f"-o {path}: unknown file type; end the name in "
            f"{' or '.join(extensions)} (HTML opens offline in a browser, PNG anywhere)")


def plot_no_folder(path: str, folder: str) -> str:
    return f"-o {path}: there is no folder {folder}; create it or write somewhere else"


def plot_is_a_folder(path: str) -> str:
    return f"-o {path}: is a folder; give a file name ending in .html or .png"


def plot_cannot_write(path: str, why: str) -> str:
    return f"cannot write {path}: {why}"


def worker_command(study: str, storage_flags: str = "") -> str:
    """The command that starts a worker on ``study``, with the flags that find its storage
    (none for the default database: a user pastes it as it is)."""
    return f"tuner worker --study {shlex.quote(study)}" + (
        f" {storage_flags}" if storage_flags else "")


def no_completed_trial(study: str, what: str, states: list[str],
                       storage_flags: str = "") -> str:
    """Why there is nothing to show or export, and what to do about it: wait, start a
    worker, or (every trial pruned or failed and none left) look at why and run more."""
    if "RUNNING" in states or "WAITING" in states:
        return (f"study {study!r} has no completed trial yet: nothing to {what}; wait for a "
                "worker to finish one (see `tuner status`)")
    if not states:
        return (f"study {study!r} has no completed trial yet: nothing to {what}; start a "
                f"worker (`{worker_command(study, storage_flags)}`)")
    pruned, failed = states.count("PRUNED"), states.count("FAIL")
    # Failed trials leave the budget unspent, pruned ones spend it: which it is, is not read
    # here, so the line says what to do in either case.
    return (f"study {study!r} has no completed trial: nothing to {what}; its "
            f"{count(pruned, 'trial')} pruned and {failed} failed are all it has run (`tuner "
            "trials` shows why): fix what stopped them, then start a worker again "
            f"(`{worker_command(study, storage_flags)}`), after raising the budget in the "
            "study file and running `tuner create` again if it is spent")
