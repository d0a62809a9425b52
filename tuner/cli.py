"""Argument parsing only: builds the parser, calls one function of :mod:`tuner.commands`, and
maps errors to exit codes (:class:`tuner.errors.ExitCode`).

Errors a user can cause end as one line on stderr and exit 2; failures of the environment as
one line and exit 1. Nothing here imports TensorFlow.

SIGTERM before a verb takes charge of signals (while the libraries load, the study is checked,
the study file is read) stops the command cleanly with exit 0: nothing was started yet, and a
scheduler that stops a worker as it starts up must not see it die of the signal. That is why
:func:`main` installs its handler before it imports the commands.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TextIO

from tuner.errors import ExitCode, TunerError, UserError


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line instead of a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        verbs = next((list(a.choices) for a in self._actions
                      if isinstance(a, argparse._SubParsersAction)), None)
        if verbs and message.endswith("required: verb"):  # plain `tuner`
            message = f"say what to do: tuner {' | '.join(verbs)}"
        elif verbs and message.startswith("argument verb: invalid choice: "):
            import difflib

            word = message.split("'")[1] if "'" in message else ""
            close = difflib.get_close_matches(word, verbs, n=1)
            message = (f"unknown verb {word!r}" + (f"; did you mean {close[0]!r}?" if close
                                                   else f"; verbs: {', '.join(verbs)}"))
        raise UserError(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """As argparse's, but a flag the verb does not take is reported by the verb's own
        parser, so the message points at its help (``tuner best --help``)."""
        opts, extra = self.parse_known_args(args, namespace)
        if extra:
            verb = getattr(opts, "verb", None)
            prog = f"{self.prog} {verb}" if verb else self.prog
            raise UserError(f"unrecognized arguments: {' '.join(extra)} "
                            f"(see `{prog} --help`)")
        return opts


def _storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", metavar="URL",
                   help="SQLAlchemy URL; default $TUNER_STORAGE, else sqlite:///tuner.db")
    p.add_argument("--storage-password-file", metavar="PATH",
                   help="read the database password from this file "
                        "(default $TUNER_STORAGE_PASSWORD_FILE)")


def _artifact_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", metavar="DIR",
                   help="directory of saved models (default: $TUNER_ARTIFACTS, else the one "
                        "recorded when the study was created)")


def _cap_flags(p: argparse.ArgumentParser, who: str) -> None:
    """Caps on what one command does, beside the study's own budget."""
    p.add_argument("--n-trials", type=_positive_int, metavar="N",
                   help=f"run at most N trials in {who}")
    p.add_argument("--timeout", type=_duration, metavar="S",
                   help="start no new trial after S seconds (or 30m, 8h, 2d)")


class _StoppedEarly(BaseException):
    """SIGTERM (or SIGHUP) arrived before the verb installed its own handler: nothing runs
    yet."""


def _stop_early(signum: int, frame: FrameType | None) -> None:
    raise _StoppedEarly(signal.Signals(signum).name)


def build_parser() -> argparse.ArgumentParser:
    from tuner import commands  # SQLAlchemy and more: after main() is ready for SIGTERM

    parser = _Parser(prog="tuner", description="Search dropout, L2 and augmentation for a "
                     "Keras image model on an Optuna study.")
    parser.add_argument("--version", action="version", version=f"tuner {_version()}")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="create or resume a study, then run trials here")
    p.add_argument("study_file", metavar="STUDY.toml")
    _storage_flags(p)
    _artifact_flag(p)
    _cap_flags(p, "this process")
    p.set_defaults(command=commands.run)

    p = sub.add_parser("create", help="register a study for remote workers (idempotent)")
    p.add_argument("study_file", metavar="STUDY.toml")
    _storage_flags(p)
    _artifact_flag(p)
    p.set_defaults(command=commands.create)

    p = sub.add_parser("worker", help="run trials of a study: one process per GPU")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    _artifact_flag(p)
    p.add_argument("--gpus", default="all", metavar="all|none|0,2",
                   help="GPUs to use, one process each (default: all visible)")
    p.add_argument("--trials-per-gpu", type=_positive_int, default=1, metavar="K",
                   help="processes per GPU, for small models (default 1)")
    _cap_flags(p, "each process of this worker")
    p.set_defaults(command=commands.worker)

    p = sub.add_parser("status", help="trial counts, best so far, running trials")
    p.add_argument("--study", metavar="NAME")
    _storage_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(command=commands.status)

    p = sub.add_parser("best", help="the best trial: parameters, val_loss, gap, epochs")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    _artifact_flag(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--export-model", metavar="PATH",
                   help="write the best trial's best-epoch model to PATH (.keras)")
    p.set_defaults(command=commands.best)

    p = sub.add_parser("confirm", help="retrain the best configurations with new seeds")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    p.add_argument("--top", type=_positive_int, default=3, metavar="K",
                   help="how many of the best configurations (default 3)")
    p.add_argument("--seeds", type=_positive_int, default=2, metavar="M",
                   help="new runs of each, with seeds of their own (default 2)")
    p.set_defaults(command=commands.confirm)

    p = sub.add_parser("trials", help="one row per trial")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(command=commands.trials)

    p = sub.add_parser("importance", help="which knob mattered, and ranges to widen")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(command=commands.importance)

    p = sub.add_parser("plot", help="learning curves and knobs to an .html or .png file")
    p.add_argument("--study", required=True, metavar="NAME")
    _storage_flags(p)
    p.add_argument("--top", type=_positive_int, default=5, metavar="N",
                   help="learning curves of the best N completed trials (default 5)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="FILE.html (plotly, opens offline) or FILE.png (no browser needed)")
    p.set_defaults(command=commands.plot)

    p = sub.add_parser("dashboard", help="optuna-dashboard on the same storage")
    _storage_flags(p)
    _artifact_flag(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8080,
                   help="port to listen on, 1-65535 (0: any free port)")
    p.set_defaults(command=commands.dashboard)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """The ``tuner`` command; ``out`` and ``err`` default to the process's streams."""
    out, err = out or sys.stdout, err or sys.stderr
    in_main_thread = threading.current_thread() is threading.main_thread()
    early = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, _stop_early) for s in early} if in_main_thread else {}
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    try:
        from tuner.settings import quiet_libraries

        logging.basicConfig(level=logging.WARNING, format="tuner: %(message)s")
        quiet_libraries()
        opts = build_parser().parse_args(argv)
        return opts.command(opts, out)
    except TunerError as exc:
        print(f"tuner: error: {exc}", file=err)
        return exc.exit_code
    except KeyboardInterrupt:
        if words[:1] in (["run"], ["worker"]):
            # as a stop signal once trials run: the same exit, so a script sees one code
            return _stopped_before_any_trial("Ctrl-C", err)
        print("tuner: interrupted", file=err)
        return ExitCode.INTERRUPTED
    except _StoppedEarly as stopped:
        return _stopped_before_any_trial(str(stopped), err)
    except BrokenPipeError:
        # The reader went away (`tuner trials | head`): not a failure. Point stdout at
        # /dev/null so that Python's own flush at exit does not complain again.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stopped_before_any_trial(what: str, err: TextIO) -> int:
    print(f"tuner: stopped by {what} before any trial started", file=err)
    from tuner.settings import signal_exit_code

    try:
        return signal_exit_code()
    except TunerError:
        return ExitCode.OK


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


def _duration(text: str) -> float:
    from tuner.spec import duration_seconds

    seconds = duration_seconds(text)
    if seconds is None or not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"expected seconds or a duration like 90s, 30m, 8h, "
                                         f"got {text!r}")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return seconds


_positive_int = _positive(int)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuner")
    except PackageNotFoundError:
        return "dev"


if __name__ == "__main__":
    sys.exit(main())
