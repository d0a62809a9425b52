"""Argument parsing only: every verb calls one function elsewhere.

Errors a user can cause end as one line on stderr and exit 2; failures of the environment as
one line and exit 1. TensorFlow is imported only by the verbs that train or load models.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from tuner.errors import TunerError, UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", metavar="URL",
                   help="SQLAlchemy URL; default $TUNER_STORAGE, else sqlite:///tuner.db")
    p.add_argument("--storage-password-file", metavar="PATH",
                   help="read the database password from this file")


def _artifact_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", metavar="DIR",
                   help="directory of saved models (default: $TUNER_ARTIFACTS, else the one "
                        "recorded when the study was created)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tuner", description="Search dropout, L2 and augmentation for a "
                     "Keras image model on an Optuna study.")
    parser.add_argument("--version", action="version", version=f"tuner {_version()}")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="create or resume a study, then run trials here")
    p.add_argument("study_file", metavar="STUDY.toml")
    _storage_flags(p)
    _artifact_flag(p)
    p.add_argument("--n-trials", type=_positive_int, metavar="N",
                   help="run at most N trials in this process")
    p.add_argument("--timeout", type=_positive_float, metavar="S",
                   help="start no new trial after S seconds")
    p.set_defaults(func=_run)

    p = sub.add_parser("create", help="register a study for remote workers (idempotent)")
    p.add_argument("study_file", metavar="STUDY.toml")
    _storage_flags(p)
    _artifact_flag(p)
    p.set_defaults(func=_create)

    p = sub.add_parser("worker", help="run trials of a study: one process per GPU")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    _artifact_flag(p)
    p.add_argument("--gpus", default="all", metavar="all|none|0,2",
                   help="GPUs to use, one process each (default: all visible)")
    p.add_argument("--trials-per-gpu", type=_positive_int, default=1, metavar="K",
                   help="processes per GPU, for small models (default 1)")
    p.add_argument("--n-trials", type=_positive_int, metavar="N",
                   help="cap on trials each process of this worker runs")
    p.add_argument("--timeout", type=_positive_float, metavar="S",
                   help="start no new trial after S seconds")
    p.set_defaults(func=_worker)

    p = sub.add_parser("status", help="trial counts, best so far, running trials")
    p.add_argument("--study", metavar="NAME")
    _storage_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)

    p = sub.add_parser("best", help="the best trial: parameters, val_loss, gap, epochs")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    _artifact_flag(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--export-model", metavar="PATH",
                   help="write the best trial's best-epoch model to PATH (.keras)")
    p.set_defaults(func=_best)

    p = sub.add_parser("confirm", help="retrain the best configurations with new seeds")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    p.add_argument("--top", type=_positive_int, default=3, metavar="K",
                   help="how many of the best configurations (default 3)")
    p.add_argument("--seeds", type=_positive_int, default=2, metavar="M",
                   help="new runs of each, with seeds of their own (default 2)")
    p.set_defaults(func=_confirm)

    p = sub.add_parser("trials", help="one row per trial")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=_trials)

    p = sub.add_parser("importance", help="which knob mattered, and ranges to widen")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_importance)

    p = sub.add_parser("dashboard", help="optuna-dashboard on the same storage")
    _storage_flags(p)
    _artifact_flag(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8080,
                   help="port to listen on, 1-65535 (0: any free port)")
    p.set_defaults(func=_dashboard)
    return parser


def _quiet_warnings() -> None:
    """Library warnings about experimental or deprecated internals mean nothing to users."""
    import warnings

    warnings.filterwarnings("ignore", module=r"optuna(\..*)?$")
    warnings.filterwarnings("ignore", message=r".*Heartbeat of storage.*")
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed.*")
    warnings.filterwarnings("ignore", message=r".*is experimental.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="tuner: %(message)s")
    _quiet_warnings()
    try:
        args = build_parser().parse_args(argv)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return args.func(args) or 0
    except TunerError as exc:
        print(f"tuner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tuner: interrupted", file=sys.stderr)
        return 130


def _url(args: argparse.Namespace) -> str:
    """The storage URL; verbs that only read refuse to create an empty SQLite file."""
    from tuner.storage import mask, resolve_url

    url = resolve_url(args.storage, args.storage_password_file)
    if args.verb in _READ_ONLY_VERBS and _missing_sqlite_file(url):
        raise UserError(f"no database at {mask(url)}: nothing has run there yet (start with "
                        "`tuner run STUDY.toml`, or pass --storage URL)")
    return url


_READ_ONLY_VERBS = {"status", "best", "trials", "importance", "dashboard", "worker", "confirm"}


def _missing_sqlite_file(url: str) -> bool:
    if not url.startswith("sqlite:///") or url.startswith("sqlite:///:memory:"):
        return False
    return not os.path.exists(url.removeprefix("sqlite:///").split("?")[0])


def _create_study(args: argparse.Namespace, verb: str):  # noqa: ANN202
    from tuner import study as studies
    from tuner.budget import Claimer
    from tuner.data import check_source
    from tuner.spec import load_spec
    from tuner.storage import default_artifacts, mask, open_storage

    spec = load_spec(args.study_file)
    check_source(spec.data)
    url = _url(args)
    storage = open_storage(url)
    artifacts = args.artifacts or os.environ.get("TUNER_ARTIFACTS") or str(default_artifacts(url))
    study, new = studies.create_or_resume(spec, storage, os.path.abspath(artifacts))
    usage, budget = Claimer(study, storage).state()
    if new:
        print(f"Created study {spec.name!r} in {mask(url)} ({budget.describe()}, "
              f"sampler {spec.sampler}, pruner {spec.pruner})")
    else:
        print(f"Study {spec.name!r} exists in {mask(url)}: {budget.progress(usage)}"
              + (", resuming" if verb == "run" else ""))
    return storage, spec


def _run(args: argparse.Namespace) -> int:
    from tuner import study as studies
    from tuner.report import best_summary, format_best, format_outcome
    from tuner.worker import Interrupted, work

    storage, spec = _create_study(args, "run")
    try:
        summary = work(storage, spec.name, n_trials=args.n_trials, timeout=args.timeout,
                       artifacts=args.artifacts,
                       progress=lambda o: print(format_outcome(o, spec.model.epochs),
                                                flush=True),
                       notice=lambda line: print(line.capitalize(), flush=True))
    except Interrupted:
        print("Interrupted: the running trial was given back; run the same command to resume.")
        return 0
    print(f"Done: {summary.stopped_because}.")
    study, _ = studies.load(spec.name, storage)
    if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        print(format_best(best_summary(study, spec)))
    return 0


def _create(args: argparse.Namespace) -> int:
    storage, spec = _create_study(args, "create")
    print(f"Start workers with: tuner worker --study {spec.name} --storage URL --gpus all")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from tuner.supervisor import run_worker_command

    return run_worker_command(_url(args), args.study, gpus=args.gpus,
                              trials_per_gpu=args.trials_per_gpu, n_trials=args.n_trials,
                              timeout=args.timeout, artifacts=args.artifacts)


def _best(args: argparse.Namespace) -> int:
    from tuner import study as studies
    from tuner.report import best_summary, format_best, to_json
    from tuner.storage import open_storage

    study, spec = studies.load(args.study, open_storage(_url(args), heartbeat=False))
    summary = best_summary(study, spec)
    if args.export_model:
        from tuner.export import export_best_model

        summary["exported_model"] = str(export_best_model(study, args.export_model,
                                                          args.artifacts))
    print(to_json(summary) if args.json else format_best(summary))
    if args.export_model and not args.json:
        print(f"Exported the best-epoch model to {summary['exported_model']}")
    return 0


def _confirm(args: argparse.Namespace) -> int:
    from tuner import study as studies
    from tuner.confirm import queue
    from tuner.storage import open_storage

    storage = open_storage(_url(args))
    study, _ = studies.load(args.study, storage)
    queued = queue(study, storage, args.top, args.seeds)
    configs = ", ".join(f"#{n}" for n in queued.configs)
    if queued.new:
        print(f"Queued {queued.trials} runs in study {args.study!r}: the top "
              f"{len(queued.configs)} configurations (trials {configs}), {queued.seeds} new "
              f"seed{'s' if queued.seeds > 1 else ''} each. The study's budget grew by "
              f"{queued.trials}; workers run them next (start one with `tuner worker --study "
              f"{args.study}` if none is running), then `tuner best` ranks them.")
    else:
        print(f"Study {args.study!r} was already confirmed: {queued.trials} runs of trials "
              f"{configs} were queued before ({queued.seeds} seeds each); `tuner best` ranks "
              "them.")
    return 0


def _status(args: argparse.Namespace) -> int:
    from tuner.inspect import status_command

    return status_command(_url(args), args.study, as_json=args.json)


def _trials(args: argparse.Namespace) -> int:
    from tuner.inspect import trials_command

    return trials_command(_url(args), args.study, args.format)


def _importance(args: argparse.Namespace) -> int:
    from tuner.inspect import importance_command

    return importance_command(_url(args), args.study, as_json=args.json)


def _dashboard(args: argparse.Namespace) -> int:
    from tuner.dashboard import run_dashboard

    return run_dashboard(_url(args), host=args.host, port=args.port, artifacts=args.artifacts)


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 1-65535 (0 picks a "
                                         "free one)")
    return value


_positive_int = _positive(int)
_positive_float = _positive(float)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuner")
    except PackageNotFoundError:
        return "dev"


if __name__ == "__main__":
    sys.exit(main())
