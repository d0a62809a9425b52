"""``tuner dashboard``: optuna-dashboard on the study storage and its saved models.

The dashboard shows each trial's per-epoch val_loss curve (Optuna intermediate values), the
parameter importances, the trial attributes tuner records, and a download link for every
trial's saved model. One dashboard serves every study of a storage but takes one artifact
store, so models are looked up in ``--artifacts DIR``, else ``$TUNER_ARTIFACTS``, else in the
directories the studies recorded when they were created (each tried in turn, first study
first; uploads from the dashboard go to the first).

Workers keep two figures and a note on each study's page (:class:`FigurePublisher`): the
learning curves of the best trials and the losses against each knob (:mod:`tuner.figures`).
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from types import FrameType
from typing import BinaryIO, TextIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import RDBStorage

from tuner import attrs, optuna_sql, render
from tuner.errors import RuntimeFailure
from tuner.settings import artifacts_dir
from tuner.storage import open_storage
from tuner.urls import mask

_log = logging.getLogger("tuner.dashboard")


class _Server(ThreadingMixIn, WSGIServer):
    """A browser loads many files at once: one thread per request."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access log: the terminal keeps only the URL line."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class SearchPathArtifactStore:
    """Reads an artifact from the first of several directories that has it."""

    def __init__(self, directories: list[Path]) -> None:
        self.stores = [FileSystemArtifactStore(str(d)) for d in directories]
        self.directories = directories

    def open_reader(self, artifact_id: str) -> BinaryIO:
        for store in self.stores:
            try:
                return store.open_reader(artifact_id)
            except ArtifactNotFound:
                continue
        raise ArtifactNotFound(f"artifact {artifact_id} not found in "
                               f"{', '.join(map(str, self.directories))}")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        for store in self.stores:
            try:
                store.remove(artifact_id)
                return
            except ArtifactNotFound:
                continue
        raise ArtifactNotFound(f"artifact {artifact_id} not found")


def artifact_directories(storage: RDBStorage, url: str, override: str | None) -> list[Path]:
    """Where the dashboard looks for saved models (see the module docstring)."""
    with storage.engine.connect() as conn:
        recorded = optuna_sql.study_attr_everywhere(conn, attrs.ARTIFACTS)
    chosen = [artifacts_dir(override, r, url).resolve() for r in recorded or [None]]
    return list(dict.fromkeys(chosen))


def run_dashboard(url: str, out: TextIO, host: str = "127.0.0.1", port: int = 8080,
                  artifacts: str | None = None) -> int:
    """Serve optuna-dashboard until Ctrl-C; writes the address to ``out`` first."""
    from optuna_dashboard import wsgi

    storage = open_storage(url, heartbeat=False)
    directories = artifact_directories(storage, url, artifacts)
    app = wsgi(storage, artifact_store=SearchPathArtifactStore(directories))
    try:
        server = make_server(host, port, app, server_class=_Server,
                             handler_class=_QuietHandler)
    except OSError as exc:
        hint = "check --host" if isinstance(exc, socket.gaierror) or \
            exc.errno == errno.EADDRNOTAVAIL else "pick another --port"
        raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                             f"({hint})") from None
    if threading.current_thread() is threading.main_thread():
        # a service manager stops it as Ctrl-C; set before the address is printed, which is
        # when whoever started it may stop it
        signal.signal(signal.SIGTERM, _stop_serving)
    shown = f"[{host}]" if ":" in host else host
    try:
        print(render.dashboard_started(mask(url),
                                       f"http://{shown}:{server.server_port}/dashboard",
                                       [str(d) for d in directories], host),
              file=out, flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("Dashboard stopped.", file=out, flush=True)
    finally:
        server.server_close()
    return 0



def _stop_serving(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# --- the study page: figures and a note, kept up to date by the workers ------------------------

# Held while a figure update runs, and by a trial while it seeds the global random generators
# and builds its model (layers take their seeds from them): an update on a thread of its own
# (a first import, say) must not draw from them in between, or a seeded study would not
# repeat itself.
RANDOM_STATE = threading.Lock()
CURVES_ID = "tuner-curves"  # optuna-dashboard graph object ids: one of each per study,
KNOBS_ID = "tuner-knobs"  # overwritten in place at every update
COST_MULTIPLE = 50  # updates at most once per 50 times an update's CPU time: <= 2 % of a worker


class FigurePublisher:
    """Keeps a study's figures and note in optuna-dashboard up to date while workers run.

    Every worker calls :meth:`after_trial` when a trial finishes (the update runs beside the
    next trial, on a thread) and :meth:`final` when it stops. An update runs under the
    study's ``figures`` lock (:func:`tuner.budget.study_lock`) and reads the trials *inside*
    it, so of two workers updating at once the second draws
    every trial the first had seen and its own: the last figures written always include every
    trial finished before that update began, and no figure is ever a mix of two writers'
    chunks (optuna-dashboard splits a figure over several attributes, one write each). At
    most one update per ``interval`` seconds per study (decided through the study attribute
    ``figures_updated_at``, so across workers), or one per :data:`COST_MULTIPLE` times the
    processor time the last update took, if that is longer (``figures_seconds``): an update
    reads and draws every trial, 0.3 s at 1,000 trials and 1.4 s at 10,000, so the figures
    never take more than 2 % of a worker's processor however large the study grows. Time
    spent waiting (a database outage, the lock) is not counted: it costs the worker nothing.
    Plus the final one, which always runs. A failed update is logged and never stops a
    worker.
    """

    def __init__(self, study: optuna.Study, storage: RDBStorage,
                 interval: float | None = None, top: int | None = None) -> None:
        from tuner import figures
        from tuner.settings import figure_interval

        self.study, self.storage = study, storage
        self.interval = figure_interval() if interval is None else interval
        self.top = figures.DEFAULT_TOP if top is None else top
        self.updates = 0
        self._warned = False
        self._thread: threading.Thread | None = None

    def after_trial(self) -> bool:
        """Start an update on a thread of its own, unless one is running or another ran
        within the interval; True if one started. The next trial trains meanwhile: drawing
        takes 0.15-0.3 s, and on a GPU worker the host's processor is mostly idle."""
        import time

        if self._thread is not None and self._thread.is_alive():
            return False
        if self._recent(time.time()):  # cheap: no lock, no trials loaded
            return False
        self._thread = threading.Thread(target=self._safely, args=(False,), daemon=True,
                                        name="tuner-figures")
        self._thread.start()
        return True

    def final(self) -> bool:
        """Update whatever the interval: the worker stops, nobody may come after it."""
        if self._thread is not None:
            self._thread.join()
        return self._safely(force=True)

    def _safely(self, force: bool) -> bool:
        try:
            with RANDOM_STATE:
                return self.update(force)
        except Exception as exc:  # noqa: BLE001 - a figure is never worth a trial
            if not self._warned:
                _log.warning("could not update the dashboard figures: %s", exc)
                self._warned = True
            return False

    def _recent(self, now: float) -> bool:
        if self.interval <= 0:  # after every trial, whatever it costs (tests, small studies)
            return False
        user_attrs = self.study.user_attrs  # one read for both
        last = user_attrs.get(attrs.FIGURES_UPDATED)
        took = float(user_attrs.get(attrs.FIGURES_SECONDS, 0.0))
        return last is not None and now - float(last) < max(self.interval,
                                                             COST_MULTIPLE * took)

    def update(self, force: bool = False) -> bool:
        """Draw and save both figures and the note now (unless throttled); True if written."""
        import time

        from tuner.budget import study_lock

        if not force and self._recent(time.time()):  # cheap: no lock, no trials loaded
            return False
        with study_lock(self.storage, self.study.study_name, "figures"):
            now = time.time()
            if not force and self._recent(now):
                return False
            cpu = time.thread_time()  # what it costs the worker: waits on the database aside
            written = publish(self.study, self.top, now)
            if written:
                self.study.set_user_attr(attrs.FIGURES_UPDATED, round(now, 3))
                if self.updates:  # a process's first also pays its imports: not the cost
                    self.study.set_user_attr(attrs.FIGURES_SECONDS,
                                             round(time.thread_time() - cpu, 3))
                self.updates += 1
            return written


def publish(study: optuna.Study, top: int, now: float) -> bool:
    """Write the figures, the note and the objective's name into ``study`` (no lock: see
    :class:`FigurePublisher`); False while the study has no completed trial."""
    from optuna_dashboard import get_note, save_note, save_plotly_graph_object

    from tuner import figures
    from tuner.inspect import importance_report

    if study.metric_names != [render.OBJECTIVE_NAME]:
        # what optuna_dashboard.set_objective_names does, without its deprecation warning
        study.set_metric_names([render.OBJECTIVE_NAME])
    facts = figures.gather(study, top)
    if facts is None:
        return False
    curves, knobs = figures.plotly_figures(facts)
    save_plotly_graph_object(study, curves, graph_object_id=CURVES_ID)
    save_plotly_graph_object(study, knobs, graph_object_id=KNOBS_ID)
    body = render.study_note(facts.best_trial, facts.best_value, facts.best_gap,
                             facts.complete, importance_report(study), now)
    old = get_note(study)
    if render.NOTE_END in old:  # keep what a user wrote under tuner's part
        body += old.split(render.NOTE_END, 1)[1]
    save_note(study, body)
    return True
