"""``tuner worker``: one child process per GPU slot, pinned, restarted, stopped cleanly.

The parent never imports TensorFlow and holds no database connection while its children
work: it finds the GPUs (``nvidia-smi -L`` or an existing ``CUDA_VISIBLE_DEVICES``), plans the
children (:func:`plan_children`, a pure function), and starts each as
``python -m tuner.supervisor --child LABEL`` with ``CUDA_VISIBLE_DEVICES`` set to its GPU alone.
Everything else a child needs travels in its environment, never on a command line (so the
password never shows in ``ps``): the storage URL in ``TUNER_STORAGE`` and the rest as one
JSON object in ``TUNER_CHILD`` (:class:`ChildConfig`).

A child that dies abnormally (killed, crashed) is started again after a pause that doubles up
to a cap (:func:`next_step`); its trial is failed and retried by whichever worker looks next.
A child that exits 0 is done (the study's budget is spent, or its ``--n-trials`` /
``--timeout`` cap is reached); one that stops with a message (five failed trials in a row,
an unknown study) is not restarted, and the parent repeats its message and exits 1 at the end.
SIGTERM, SIGINT or SIGHUP to the parent is forwarded as SIGTERM; each child gives its running trial
back and exits, and the parent exits 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from tuner import render
from tuner.errors import ExitCode, RuntimeFailure, TunerError, UserError
from tuner.settings import STOP_SIGNALS, signal_exit_code

MAX_RESTARTS = 5
STABLE_SECONDS = 600.0  # a child that ran this long before dying starts a fresh restart count
STOP_GRACE_SECONDS = 20.0  # after a stop request, children still alive this long are killed
EXIT_DONE, EXIT_STOPPED, EXIT_CRASHED = ExitCode.OK, ExitCode.CHILD_STOPPED, \
    ExitCode.CHILD_CRASHED
_DEVICE = re.compile(r"^(\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9A-Za-z/-]+)$")


@dataclass(frozen=True)
class Slot:
    """One child process: its place on this node and the GPU it sees ("" = CPU only)."""

    index: int
    device: str
    ordinal: int = 0  # which of the --trials-per-gpu processes on this device

    @property
    def label(self) -> str:
        """How its output lines start: gpu0, gpu0.1 (the second on GPU 0), cpu, cpu.1."""
        base = f"gpu{self.device}" if self.device else "cpu"
        return f"{base}.{self.ordinal}" if self.ordinal else base


def parse_gpus(text: str, visible: str | None = None,
               discover: bool = True) -> list[str]:
    """``--gpus`` → device ids. ``all``: ``visible`` (``$CUDA_VISIBLE_DEVICES``) if set, else
    every GPU ``nvidia-smi -L`` lists; ``none`` (or no GPU found): ``[]``, i.e. the CPU. An
    explicit index must be one ``nvidia-smi -L`` lists, where it runs (``discover``)."""
    text = text.strip()
    if text == "none":
        return []
    if text == "all":
        if visible is not None:
            return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
        return _nvidia_smi_gpus() if discover else []
    devices = [d.strip() for d in text.split(",")]
    bad = [d for d in devices if not _DEVICE.match(d)]
    if bad:
        raise UserError(f"--gpus: {bad[0]!r} is not a GPU index or UUID; expected all, none, "
                        "or a list like 0,2")
    if len(set(devices)) != len(devices):
        raise UserError(f"--gpus: {text!r} names a GPU twice; use --trials-per-gpu K to run "
                        "K processes on each GPU")
    # A wrong index would not fail anywhere: TensorFlow would see no GPU and train on the CPU.
    known = _nvidia_smi_gpus() if discover and any(d.isdigit() for d in devices) else []
    missing = [d for d in devices if d.isdigit() and known and d not in known]
    if missing:
        raise UserError(f"--gpus: this node has no GPU {missing[0]}; nvidia-smi -L lists "
                        f"{', '.join(known)} (or use --gpus all)")
    return devices


def plan_children(devices: list[str], trials_per_gpu: int = 1) -> list[Slot]:
    """``trials_per_gpu`` children per device, GPU by GPU; no device → that many CPU children."""
    if trials_per_gpu < 1:
        raise UserError(f"--trials-per-gpu must be at least 1, got {trials_per_gpu}")
    pairs = [(d, k) for d in devices or [""] for k in range(trials_per_gpu)]
    return [Slot(i, d, k) for i, (d, k) in enumerate(pairs)]


def next_step(returncode: int, restarts: int, uptime: float, stopping: bool
              ) -> tuple[str, float]:
    """What to do about a child that exited: ``("done"|"stopped"|"restart"|"give-up", pause)``.

    ``restarts`` counts this slot's earlier restarts since it was last stable.
    """
    if returncode == EXIT_DONE or stopping:
        return "done", 0.0
    if returncode in (EXIT_STOPPED, ExitCode.FAILURE, ExitCode.USER_ERROR):
        return "stopped", 0.0
    if uptime >= STABLE_SECONDS:
        restarts = 0
    if restarts >= MAX_RESTARTS:
        return "give-up", 0.0
    return "restart", min(2.0 ** restarts, 30.0)


@dataclass
class _Child:
    slot: Slot
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    incarnation: int = 0
    restart_at: float | None = None
    outcome: str = ""
    message: str = ""
    report: Path = field(default_factory=Path)
    returncode: int | None = None  # of the last process in this slot


@dataclass(frozen=True)
class ChildConfig:
    """What one child process is told, through ``$TUNER_CHILD`` (JSON)."""

    study: str
    label: str
    seed_offset: int = 0
    n_trials: int | None = None
    timeout: float | None = None
    artifacts: str | None = None
    report: str | None = None  # a file for the child's last word, if it stops with a message

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ChildConfig:
        return cls(**json.loads(os.environ["TUNER_CHILD"]))


def run_worker_command(url: str, study: str, out: TextIO, *, gpus: str = "all",
                       trials_per_gpu: int = 1, n_trials: int | None = None,
                       timeout: float | None = None, artifacts: str | None = None) -> int:
    """Check the study, start the children, supervise them until all are done; exit code."""
    signal_exit_code()  # a bad setting is one line now, not after hours of trials
    _check_study(url, study)
    devices = parse_gpus(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    slots = plan_children(devices, trials_per_gpu)
    say(out, render.worker_started(socket.gethostname(), os.getpid(), study,
                                   [s.label for s in slots]))
    with tempfile.TemporaryDirectory(prefix="tuner-worker-") as tmp:
        supervisor = _Supervisor(url, study, slots, Path(tmp), out, n_trials=n_trials,
                                 timeout=timeout, artifacts=artifacts)
        return supervisor.run()


def say(out: TextIO, line: str) -> None:
    """One line now: the parent's and children's lines interleave in one terminal or log."""
    print(line, file=out, flush=True)


class _Supervisor:
    def __init__(self, url: str, study: str, slots: list[Slot], tmp: Path, out: TextIO, *,
                 n_trials: int | None, timeout: float | None, artifacts: str | None) -> None:
        self.url, self.study, self.tmp, self.out = url, study, tmp, out
        self.n_trials, self.timeout, self.artifacts = n_trials, timeout, artifacts
        self.children = [_Child(s, report=tmp / f"child-{s.index}.txt") for s in slots]
        self.stopping: str | None = None
        self.stop_deadline = 0.0
        self.killed: set[int] = set()  # children killed while stopping: trials not given back
        self.salt = zlib.crc32(f"{socket.gethostname()}/{os.getpid()}".encode()) % 100_000

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            for child in self.children:
                if self.stopping:
                    break
                self._start(child)
            while any(c.outcome == "" for c in self.children):
                self._tick()
                time.sleep(0.2)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return self._finish()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stopping is None:
            self.stopping = name
            self.stop_deadline = time.monotonic() + STOP_GRACE_SECONDS
            say(self.out, render.worker_stopping(name))
            self._send(signal.SIGTERM)
        else:
            self._send(signal.SIGKILL)  # asked twice: do not wait (trials retried via heartbeat)

    def _send(self, sig: signal.Signals) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                try:
                    child.proc.send_signal(sig)
                except ProcessLookupError:
                    continue
                if sig == signal.SIGKILL:
                    self.killed.add(child.proc.pid)

    def _tick(self) -> None:
        now = time.monotonic()
        if self.stopping and now > self.stop_deadline:
            self._send(signal.SIGKILL)
        for child in self.children:
            if child.outcome:
                continue
            if child.proc is None:
                if self.stopping:
                    child.outcome = "done"
                elif child.restart_at is not None and now >= child.restart_at:
                    self._start(child)
                continue
            rc = child.proc.poll()
            if rc is None:
                continue
            uptime = now - child.started
            action, pause = next_step(rc, child.restarts, uptime, self.stopping is not None)
            label = f"[{child.slot.label}]"
            if action == "restart":
                child.restarts = 0 if uptime >= STABLE_SECONDS else child.restarts
                child.restarts += 1
                child.proc, child.restart_at = None, now + pause
                say(self.out, f"{label} process {_describe_exit(rc)}; restarting in {pause:g}s "
                              f"(restart {child.restarts} of {MAX_RESTARTS})")
            elif action == "give-up":
                child.outcome = "failed"
                child.message = (f"{label} process {_describe_exit(rc)} {MAX_RESTARTS + 1} "
                                 "times in a row; not restarting it")
                say(self.out, child.message)
            elif action == "stopped":
                child.outcome, child.returncode = "failed", rc
                child.message = f"{label} {_read(child.report) or 'stopped: ' + _describe_exit(rc)}"
            else:
                child.outcome = "done"

    def _start(self, child: _Child) -> None:
        slot = child.slot
        child.incarnation += 1
        config = ChildConfig(study=self.study, label=slot.label,
                             seed_offset=self.salt * 1000 + slot.index * 50 + child.incarnation,
                             n_trials=self.n_trials, timeout=self.timeout,
                             artifacts=self.artifacts, report=str(child.report))
        env = {**os.environ, "TUNER_STORAGE": self.url, "CUDA_VISIBLE_DEVICES": slot.device,
               "PYTHONUNBUFFERED": "1", "TF_FORCE_GPU_ALLOW_GROWTH": "true",
               "TUNER_CHILD": config.to_env()}
        child.report.unlink(missing_ok=True)
        child.proc = subprocess.Popen(
            [sys.executable, "-m", "tuner.supervisor", "--child", slot.label], env=env,
            stdout=_fd(self.out), stderr=None, preexec_fn=_die_with_parent)
        child.started, child.restart_at = time.monotonic(), None
        say(self.out, f"[{slot.label}] started process {child.proc.pid}")
        if self.stopping:  # the signal came while Popen ran, before _send could see this child
            child.proc.send_signal(signal.SIGTERM)

    def _finish(self) -> int:
        if self.stopping:
            say(self.out, render.worker_stopped(len(self.killed)))
            return signal_exit_code()
        failed = [c for c in self.children if c.outcome == "failed"]
        # Every child stopped by a bad setting (a model family that does not import, say):
        # the user's to fix, exit 2, as `tuner run` says of the same study.
        user = bool(failed) and all(c.returncode == ExitCode.USER_ERROR for c in failed)
        if failed and len(self.children) == 1 and _read(self.children[0].report):
            # its own "tuner: error:" line is the last one already
            return ExitCode.USER_ERROR if user else ExitCode.FAILURE
        if failed:
            raise (UserError if user else RuntimeFailure)("; ".join(c.message for c in failed))
        say(self.out, render.worker_done())
        return ExitCode.OK


def _check_study(url: str, study: str) -> None:
    """Fail fast in the parent (unknown study, unreachable database); hold no connection."""
    from tuner import study as studies
    from tuner.storage import open_storage

    storage = open_storage(url, heartbeat=False)
    try:
        studies.load(study, storage)
    finally:
        storage.engine.dispose()


def _nvidia_smi_gpus() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", out.stdout, re.MULTILINE)]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies (Linux), never orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


# --- the child process -------------------------------------------------------------------------


def child_main(argv: list[str] | None = None) -> int:
    """One worker loop on the device the parent chose; exit codes per :func:`next_step`."""
    config = ChildConfig.from_env()
    prefix = f"[{config.label}]"
    _quiet(prefix)
    from tuner.worker import Interrupted

    try:
        with _early_interrupts():
            return _child_work(config, prefix)
    except Interrupted:
        say(sys.stdout, f"{prefix} stopped; its running trial (if any) was given back")
        return EXIT_DONE
    except TunerError as exc:
        print(f"tuner: error: {prefix} {exc}", file=sys.stderr, flush=True)
        if config.report:
            Path(config.report).write_text(str(exc), encoding="utf-8")
        # a bad setting (exit 2) stays one for the parent, and for a Job that must not retry
        return ExitCode.USER_ERROR if isinstance(exc, UserError) else EXIT_STOPPED
    except Exception as exc:  # noqa: BLE001 - a crash: the parent restarts this process
        if _early_interrupts.received:  # the signal, made another error by the import it hit
            say(sys.stdout, f"{prefix} stopped; its running trial (if any) was given back")
            return EXIT_DONE
        import traceback

        traceback.print_exc()
        print(f"tuner: {prefix} crashed: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        return EXIT_CRASHED


def _child_work(config: ChildConfig, prefix: str) -> int:
    from tuner import study as studies
    from tuner.settings import storage_url
    from tuner.storage import open_storage
    from tuner.worker import work

    storage = open_storage(storage_url(), wait=True)  # restarted in an outage: wait it out
    study, spec = studies.load(config.study, storage)
    out = sys.stdout
    say(out, f"{prefix} process {os.getpid()} working on study {config.study!r}")
    summary = work(storage, study, spec, n_trials=config.n_trials, timeout=config.timeout,
                   artifacts=config.artifacts, seed_offset=config.seed_offset,
                   hung_exit=EXIT_CRASHED,
                   progress=lambda o: say(out, f"{prefix} {render.outcome(o, spec.model.epochs)}"),
                   notice=lambda line: say(out, f"{prefix} {line}"))
    say(out, f"{prefix} {render.worker_child_done(summary.trials_run, summary.stopped_because)}")
    return EXIT_DONE


class _early_interrupts:  # noqa: N801 - a context manager
    """SIGTERM/SIGINT before the worker loop takes over (importing TensorFlow, loading data):
    nothing to give back yet, so the exception is raised wherever it lands. ``received``
    says it came, should a C extension turn it into another error."""

    received = ""

    def __enter__(self) -> None:
        from tuner.worker import Interrupted

        def handler(signum: int, frame: FrameType | None) -> None:
            for stop in STOP_SIGNALS:
                signal.signal(stop, signal.SIG_IGN)
            _early_interrupts.received = signal.Signals(signum).name
            raise Interrupted(_early_interrupts.received)

        for stop in STOP_SIGNALS:
            signal.signal(stop, handler)

    def __exit__(self, *exc: object) -> None:
        for stop in STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)


def _quiet(prefix: str) -> None:
    import logging

    from tuner.settings import quiet_libraries

    logging.basicConfig(level=logging.WARNING, format=f"tuner: {prefix} %(message)s")
    quiet_libraries()


def _fd(out: TextIO) -> int | None:
    """A child writes straight to the parent's output when it is a real file (a terminal, a
    log); into a stream that is not (a test's buffer), its lines go to the process' own."""
    try:
        return out.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _exit_now(code: int) -> None:
    """End the child without the interpreter's teardown: after many trials, collecting Keras'
    and TensorFlow's garbage at exit took minutes (a 1,000-trial child: over two). Nothing is
    left to do by then: the trial was told, the heartbeat stopped, the lines written."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(child_main())
