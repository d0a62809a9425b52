"""``tuner dashboard``: optuna-dashboard on the study storage and its saved models.

The dashboard shows each trial's per-epoch val_loss curve (Optuna intermediate values), the
parameter importances, the trial attributes tuner records, and a download link for every
trial's saved model. One dashboard serves every study of a storage but takes one artifact
store, so models are looked up in ``--artifacts DIR``, else ``$TUNER_ARTIFACTS``, else in the
directories the studies recorded when they were created (each tried in turn, first study
first; uploads from the dashboard go to the first).
"""

from __future__ import annotations

from pathlib import Path
from socketserver import ThreadingMixIn
from typing import BinaryIO, TextIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import RDBStorage

from tuner import attrs, optuna_sql, render
from tuner.errors import RuntimeFailure
from tuner.settings import artifacts_dir
from tuner.storage import open_storage
from tuner.urls import mask


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
        raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror or exc} (pick "
                             "another --port)") from None
    shown = f"[{host}]" if ":" in host else host
    print(render.dashboard_started(mask(url), f"http://{shown}:{server.server_port}/dashboard",
                                   [str(d) for d in directories], host), file=out, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("Dashboard stopped.", file=out, flush=True)
    finally:
        server.server_close()
    return 0

