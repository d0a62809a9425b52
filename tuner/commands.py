"""One function per verb: parsed options and an output stream in, an exit code out.

The CLI (:mod:`tuner.cli`) only parses and maps errors to exit codes; everything a verb does is
here, and every line it writes goes to ``out`` (worded by :mod:`tuner.render`), so a verb runs
in-process in a test as it does in a terminal. Read-only verbs import no TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import TYPE_CHECKING, TextIO

from tuner import render, settings
from tuner.errors import ExitCode, UserError
from tuner.urls import mask, parse_url

if TYPE_CHECKING:
    import optuna


def _storage_flags(url: str) -> str:
    """The flags that point a worker elsewhere at ``url``, ready to paste: never its password
    (a worker reads one from a file), and a relative SQLite path made absolute."""
    from sqlalchemy.engine import URL

    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        parsed = parsed.set(database=os.path.abspath(parsed.database))
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port,
                      parsed.database, parsed.query).render_as_string(hide_password=False)
    return f"--storage {shlex.quote(bare)}" + (
        " --storage-password-file FILE" if parsed.password else "")


def _hint_flags(url: str) -> str:
    """The storage flags of a worker command in a hint: none for the default database."""
    return "" if url == settings.DEFAULT_STORAGE else _storage_flags(url)


def _no_completed_trial(study: optuna.Study, what: str, url: str) -> None:
    """Raise, with a worker command to paste, when ``study`` has nothing to ``what`` yet.
    The check is one query for the best trial: every trial is read only to say why not."""
    from tuner.errors import RuntimeFailure

    try:
        study.best_trial  # noqa: B018 - raises ValueError without a completed trial
    except ValueError:
        raise RuntimeFailure(render.no_completed_trial(
            study.study_name, what, [t.state.name for t in study.get_trials(deepcopy=False)],
            _hint_flags(url))) from None


def run(opts: argparse.Namespace, out: TextIO) -> int:
    """``tuner run``: create or resume the study, work on it here, then show the winner."""
    from tuner.worker import Interrupted, work

    storage, study, spec, _ = _create_or_resume(opts, out, resuming=True)
    try:
        summary = work(storage, study, spec, n_trials=opts.n_trials, timeout=opts.timeout,
                       artifacts=opts.artifacts,
                       progress=lambda o: _say(out, render.outcome(o, spec.model.epochs)),
                       notice=lambda line: _say(out, line[:1].upper() + line[1:]))
    except Interrupted:
        _say(out, render.run_interrupted())
        return ExitCode.OK
    _say(out, render.run_done(summary.stopped_because))
    if study.get_trials(deepcopy=False, states=_complete()):
        from tuner.inspect import best_summary

        _say(out, render.best(best_summary(study, spec)))
    return ExitCode.OK


def create(opts: argparse.Namespace, out: TextIO) -> int:
    """``tuner create``: register the study (idempotent) for workers elsewhere."""
    import time

    from tuner.budget import Decision, decide

    storage, _, spec, state = _create_or_resume(opts, out, resuming=False)
    verdict = decide(*state, time.time())
    if verdict.decision is Decision.STOP:  # a worker started now would only say so and exit
        _say(out, render.nothing_to_run(verdict.reason))
    else:
        _say(out, render.start_workers(spec.name, _storage_flags(storage.url)))
    return ExitCode.OK


def worker(opts: argparse.Namespace, out: TextIO) -> int:
    """``tuner worker``: one child process per GPU until the study's budget is spent."""
    from tuner.supervisor import run_worker_command

    return run_worker_command(_existing_url(opts), opts.study, out, gpus=opts.gpus,
                              trials_per_gpu=opts.trials_per_gpu, n_trials=opts.n_trials,
                              timeout=opts.timeout, artifacts=opts.artifacts)


def confirm(opts: argparse.Namespace, out: TextIO) -> int:
    """``tuner confirm``: queue new runs of the best configurations (once per study)."""
    from tuner import confirm as confirming
    from tuner import study as studies
    from tuner.storage import open_storage

    url = _existing_url(opts)
    storage = open_storage(url)
    study, spec = studies.load(opts.study, storage)
    queued = confirming.queue(study, storage, opts.top, opts.seeds)
    budgets = (spec.n_trials is not None,
               spec.model.epochs if spec.epoch_budget is not None else None,
               spec.time_budget is not None)
    _say(out, render.confirm_queued(opts.study, queued, (opts.top, opts.seeds), budgets,
                                    _hint_flags(url)))
    return ExitCode.OK


def status(opts: argparse.Namespace, out: TextIO) -> int:
    """``tuner status``: every study's (or one study's) counts, best and running trials."""
    from dataclasses import asdict

    from tuner.inspect import all_status
    from tuner.storage import open_engine

    url = _existing_url(opts)
    engine = open_engine(url)
    try:
        found = all_status(engine, opts.study)
    finally:
        engine.dispose()
    if opts.json:
        _say(out, render.to_json({"storage": mask(url), "studies": [asdict(s) for s in found]}))
    elif not found:
        _say(out, render.no_studies(mask(url)))
    else:
        _say(out, "\n\n".join(render.status(s) for s in found))
    return ExitCode.OK


def best(opts: argparse.Namespace, out: TextIO) -> int:
    """``tuner best``: the winner, as text or JSON; ``--export-model`` writes its model."""
    from tuner import study as studies
    from tuner.inspect import best_summary
    from tuner.storage import open_storage

    url = _existing_url(opts)
    study, spec = studies.load(opts.study, open_storage(url, heartbeat=False))
    _no_completed_trial(study, "export" if opts.export_model else "show", url)
    summary = best_summary(study, spec)
    if opts.export_model:
        from tuner.export import chosen_trial, export_best_model

        chosen = chosen_trial(study)
        summary["exported_model"] = str(export_best_model(study, opts.export_model,
                                                          opts.artifacts, chosen))
    _say(out, render.to_json(summary) if opts.json else render.best(summary))
    if opts.export_model and not opts.json:
        _say(out, render.exported(summary["exported_model"], chosen.number))
    return ExitCode.OK


def trials(opts: argparse.Namespace, out: TextIO) -> int:
    """``tuner trials``: every trial of a study as a table, CSV or JSON."""
    from tuner import study as studies
    from tuner.inspect import trial_rows
    from tuner.storage import open_storage

    study, spec = studies.load(opts.study, open_storage(_existing_url(opts), heartbeat=False))
    _say(out, render.trials(trial_rows(study, spec), opts.format))
    return ExitCode.OK


def importance(opts: argparse.Namespace, out: TextIO) -> int:
    """``tuner importance``: which knob mattered, and which ranges to widen."""
    from tuner import study as studies
    from tuner.inspect import importance_report
    from tuner.storage import open_storage

    study, _ = studies.load(opts.study, open_storage(_existing_url(opts), heartbeat=False))
    report = importance_report(study)
    _say(out, render.to_json(report) if opts.json else render.importance(report))
    return ExitCode.OK


def plot(opts: argparse.Namespace, out: TextIO) -> int:
    """``tuner plot``: the dashboard's figures to a standalone ``.html`` or a ``.png``."""
    from pathlib import Path

    from tuner import figures
    from tuner import study as studies
    from tuner.errors import RuntimeFailure
    from tuner.storage import open_storage

    dest = Path(opts.output).expanduser()
    figures.check_extension(dest)  # before the database: a typo costs nothing
    figures.check_writable(dest)
    url = _existing_url(opts)
    study, _ = studies.load(opts.study, open_storage(url, heartbeat=False))
    _no_completed_trial(study, "plot", url)
    facts = figures.gather(study, opts.top)
    if facts is None:
        raise RuntimeFailure(render.no_completed_trial(opts.study, "plot", [
            t.state.name for t in study.get_trials(deepcopy=False)]))
    figures.write(facts, dest)
    _say(out, render.plot_written(str(dest), opts.study, len(facts.curves), facts.complete))
    return ExitCode.OK


def dashboard(opts: argparse.Namespace, out: TextIO) -> int:
    """``tuner dashboard``: optuna-dashboard on the same storage, until Ctrl-C."""
    from tuner.dashboard import run_dashboard

    return run_dashboard(_existing_url(opts), out, host=opts.host, port=opts.port,
                         artifacts=opts.artifacts)


# --- shared steps ------------------------------------------------------------------------------


def _create_or_resume(opts: argparse.Namespace, out: TextIO, resuming: bool):  # noqa: ANN202
    """Parse and check the study file, then create or resume its study; says which. Also
    returns the study's usage and budget as read then."""
    from tuner import study as studies
    from tuner.budget import Claimer
    from tuner.data import check_source
    from tuner.spec import load_spec
    from tuner.storage import open_storage

    spec = load_spec(opts.study_file)
    check_source(spec.data)
    if resuming and ":" in spec.model.family:  # trials run here: a user's model must import
        from tuner.tfsetup import init_tensorflow  # (`tuner create` may run where it cannot)

        init_tensorflow()  # quietly, before the model's module imports Keras
        from tuner.models import resolve_family

        resolve_family(spec.model.family)
    url = settings.storage_url(opts.storage, opts.storage_password_file)
    artifacts = os.path.abspath(settings.artifacts_dir(opts.artifacts, None, url))
    if resuming and opts.artifacts:  # trials run here: the directory must be usable here
        try:  # (`tuner create` may name a path that only the GPU nodes have)
            os.makedirs(artifacts, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--artifacts: cannot use {artifacts}: {exc.strerror}") from None
    storage = open_storage(url)
    changes = studies.changed_settings(spec, storage)
    study, new = studies.create_or_resume(spec, storage, str(artifacts))
    usage, budget = Claimer(study, storage).state()
    if new:
        _say(out, render.study_created(spec.name, mask(url), budget.describe(), spec.sampler,
                                       spec.pruner))
    else:
        _say(out, render.study_exists(spec.name, mask(url), budget.progress(usage), resuming))
        if changes:
            _say(out, render.settings_changed(changes))
    return storage, study, spec, (usage, budget)


def _existing_url(opts: argparse.Namespace) -> str:
    """The storage URL, for verbs that need a database that exists: they never create an
    empty SQLite file by accident."""
    url = settings.storage_url(opts.storage, opts.storage_password_file)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:") and \
            not os.path.exists(url.removeprefix("sqlite:///").split("?")[0]):
        raise UserError(f"no database at {mask(url)}: nothing has run there yet (start with "
                        "`tuner run STUDY.toml`, or pass --storage URL)")
    return url


def _complete() -> tuple:  # noqa: ANN202
    from optuna.trial import TrialState

    return (TrialState.COMPLETE,)


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)
