"""Only the best K models are kept: three real workers finishing trials at once on the real
PostgreSQL, the artifact directory watched all along; export after retention; keep_models 0
and bad values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import cli, run_tuner, write_study
from test_faults import Worker, _trials, workers  # noqa: F401

from tuner import attrs, optuna_sql

pytestmark = pytest.mark.slow
KEEP = 2


def _best_model_on_disk(engine: sqlalchemy.Engine, name: str, artifacts: Path) -> bool | None:
    """Whether the current best trial's model file exists (``None``: no best with a model)."""
    with engine.connect() as conn:
        found = optuna_sql.studies(conn, name)
        if not found:
            return None
        best = optuna_sql.best_trial(conn, found[0][0])
        if best is None:
            return None
        artifact = optuna_sql.trial_attrs(conn, best["trial_id"], (attrs.MODEL_ARTIFACT,))
    artifact_id = artifact.get(attrs.MODEL_ARTIFACT)
    return None if artifact_id is None else (artifacts / artifact_id).is_file()


def test_three_workers_keep_only_the_best_k(tmp_path: Path, pg_url: str,
                                            workers: list[Worker]) -> None:  # noqa: F811
    artifacts = tmp_path / "models"
    study = write_study(tmp_path, "keep", n_trials=14, epochs=2, family="user_models:tiny",
                        extra_study=f"keep_models = {KEEP}")
    assert cli("create", str(study), "--storage", pg_url, "--artifacts",
               str(artifacts)).returncode == 0
    engine = sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.pool.NullPool)
    peak, missing, stop = [0], [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            files = len(list(artifacts.glob("*"))) if artifacts.is_dir() else 0
            peak[0] = max(peak[0], files)
            if _best_model_on_disk(engine, "keep", artifacts) is False:
                missing.append(time.monotonic())
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for name in ("a", "b", "c"):
        workers.append(Worker(tmp_path, name, "--study", "keep", "--gpus", "none",
                              storage=pg_url))
    codes = [w.wait() for w in workers]
    stop.set()
    watcher.join()
    engine.dispose()
    assert codes == [0, 0, 0], [w.stderr for w in workers]
    assert not missing, "the best trial's model was missing while workers ran"
    assert peak[0] <= KEEP + 3, f"peak {peak[0]} models > K + workers"
    complete = sorted((t for t in _trials(pg_url, "keep") if t.state.name == "COMPLETE"),
                      key=lambda t: t.value)
    with_model = [t for t in complete if t.user_attrs.get("model_artifact")]
    assert [t.number for t in with_model] == [t.number for t in complete[:KEEP]]
    on_disk = sorted(p.name for p in artifacts.iterdir())
    assert on_disk == sorted(t.user_attrs["model_artifact"] for t in with_model)
    # Optuna's own artifact reader (as the dashboard's) sees exactly the models kept
    storage = optuna.storages.RDBStorage(pg_url)
    listed = sorted(meta.artifact_id for t in complete
                    for meta in optuna.artifacts.get_all_artifact_meta(t, storage=storage))
    assert listed == on_disk
    print(f"\n[keep_models {KEEP}, 3 workers] {len(complete)} complete trials, models at the "
          f"end {len(on_disk)}, peak {peak[0]}")

    exported = tmp_path / "best.keras"
    best = cli("best", "--study", "keep", "--storage", pg_url, "--artifacts", str(artifacts),
               "--json", "--export-model", str(exported))
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["trial"] == complete[0].number
    assert exported.stat().st_size > 1000


_STOPPED_WHILE_SAVING = """
import os, sys, time
import tuner.trial

save = tuner.trial.save_model

def save_then_hang(model, store, artifact_id=None):
    saved = save(model, store, artifact_id)
    print("SAVED", saved, flush=True)
    # the signal lands here: file and record written, trial not yet told
    time.sleep(float(os.environ["SAVE_PAUSE"]))
    return saved

tuner.trial.save_model = save_then_hang
from tuner.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _stop_while_saving(tmp_path: Path, pg_url: str, stop: signal.Signals,
                       pause: float) -> tuple[str, Path]:
    """A one-epoch study run by a worker whose save takes ``pause`` seconds more; ``stop``
    is sent once the model's file and record are written. Its saved artifact id."""
    artifacts = tmp_path / "models"
    study = write_study(tmp_path, "stop", n_trials=2, epochs=1, extra_study="keep_models = 1")
    cmd = [sys.executable, "-c", _STOPPED_WHILE_SAVING, "run", str(study), "--storage", pg_url,
           "--artifacts", str(artifacts)]
    fast = {"TUNER_HEARTBEAT_INTERVAL": "1", "TUNER_GRACE_PERIOD": "3"}  # the dead found soon
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "SAVE_PAUSE": str(pause),
                                 **fast})
    assert proc.stdout is not None
    saved = next((line.split()[1] for line in proc.stdout if line.startswith("SAVED")), None)
    assert saved is not None and (artifacts / saved).is_file()
    proc.send_signal(stop)
    assert proc.wait(timeout=60) == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    again = run_tuner("run", str(study), "--storage", pg_url, "--artifacts", str(artifacts),
                      env={**os.environ, **fast})
    assert again.returncode == 0, again.stderr
    return saved, artifacts


def test_a_worker_killed_while_saving_leaves_no_model_behind(tmp_path: Path,
                                                             pg_url: str) -> None:
    """The model of a trial whose worker dies between saving it and telling the result is
    deleted with its failed trial by another worker, and its queued rerun does not name it:
    the K hold on preemptible nodes too."""
    saved, artifacts = _stop_while_saving(tmp_path, pg_url, signal.SIGKILL, pause=120)
    trials = _trials(pg_url, "stop")
    stopped = trials[0]
    assert stopped.state.name == "FAIL" and stopped.user_attrs.get(attrs.MODEL_ARTIFACT) is None
    rerun = next(t for t in trials if t.system_attrs.get("failed_trial") == stopped.number)
    assert f"artifacts:{saved}" not in rerun.system_attrs
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert sorted(p.name for p in artifacts.iterdir()) == [best.user_attrs["model_artifact"]]


def test_sigterm_while_saving_finishes_the_trained_trial_first(tmp_path: Path,
                                                               pg_url: str) -> None:
    """SIGTERM after training stops the worker only once the save and the tell are done: the
    trial's epochs are not thrown away, and its model is kept or dropped by the best-K rule
    like any other."""
    saved, artifacts = _stop_while_saving(tmp_path, pg_url, signal.SIGTERM, pause=2)
    trials = _trials(pg_url, "stop")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    # its own model, unless the next trial did better and keep_models = 1 dropped it
    assert trials[0].user_attrs.get(attrs.MODEL_ARTIFACT) in (saved, None)
    best = min(trials, key=lambda t: t.value)
    assert sorted(p.name for p in artifacts.iterdir()) == [best.user_attrs["model_artifact"]]


def test_keep_models_0_keeps_none_and_export_says_why(tmp_path: Path, pg_url: str) -> None:
    study = write_study(tmp_path, "none", n_trials=2, epochs=1, extra_study="keep_models = 0")
    assert cli("run", str(study), "--storage", pg_url, cwd=tmp_path).returncode == 0
    assert not list((tmp_path / "tuner-artifacts").glob("*"))
    export = cli("best", "--study", "none", "--storage", pg_url, "--export-model",
                 str(tmp_path / "m.keras"))
    assert export.returncode == 2, export.stderr
    lines = export.stderr.strip().splitlines()
    assert len(lines) == 1 and "keeps no models ([study] keep_models = 0)" in lines[0]
    # keep_models raised after the fact: the best trial still has none, and the line says why
    # and how to get one (a confirm run keeps its model whatever keep_models says)
    study.write_text(study.read_text().replace("keep_models = 0", "keep_models = 1"))
    assert cli("create", str(study), "--storage", pg_url, cwd=tmp_path).returncode == 0
    export = cli("best", "--study", "none", "--storage", pg_url, "--export-model",
                 str(tmp_path / "m.keras"))
    assert export.returncode == 1 and export.stderr.count("\n") == 1, export.stderr
    assert "none was kept when it finished (keep_models was 0 then" in export.stderr
    assert cli("confirm", "--study", "none", "--storage", pg_url, "--top", "1", "--seeds",
               "1").returncode == 0
    assert cli("worker", "--study", "none", "--storage", pg_url, "--gpus", "none",
               cwd=tmp_path).returncode == 0
    export = cli("best", "--study", "none", "--storage", pg_url, "--export-model",
                 str(tmp_path / "m.keras"))
    assert export.returncode == 0 and (tmp_path / "m.keras").stat().st_size > 0, export.stderr


@pytest.mark.parametrize("value", ["-1", '"some"', "1.5", "true"])
def test_bad_keep_models_is_one_line(tmp_path: Path, value: str) -> None:
    study = write_study(tmp_path, "bad", extra_study=f"keep_models = {value}")
    result = cli("create", str(study), "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[study] keep_models" in lines[0] and '"all"' in lines[0]
    assert not (tmp_path / "x.db").exists()


def test_running_workers_follow_a_lowered_keep_models(tmp_path: Path, pg_url: str,
                                                     workers: list[Worker]) -> None:  # noqa: F811
    """keep_models changes as a budget does: `tuner create` with the new value, and a worker
    already running keeps only the new K once its next trial is done."""
    artifacts = tmp_path / "models"
    study = write_study(tmp_path, "lower", n_trials=8, epochs=2, family="user_models:slow",
                        extra_study="keep_models = 3")
    assert cli("create", str(study), "--storage", pg_url, "--artifacts",
               str(artifacts)).returncode == 0
    workers.append(Worker(tmp_path, "a", "--study", "lower", "--gpus", "none", storage=pg_url))
    deadline = time.monotonic() + 300
    while sum(t.state.name == "COMPLETE" for t in _trials(pg_url, "lower")) < 3:
        assert workers[0].proc.poll() is None and time.monotonic() < deadline, \
            workers[0].stderr
        time.sleep(0.2)
    study.write_text(study.read_text().replace("keep_models = 3", "keep_models = 1"))
    assert cli("create", str(study), "--storage", pg_url).returncode == 0
    assert workers[0].wait() == 0, workers[0].stderr
    complete = [t for t in _trials(pg_url, "lower") if t.state.name == "COMPLETE"]
    assert len(complete) == 8  # the change came with trials still to run
    best = min(complete, key=lambda t: t.value)
    assert sorted(p.name for p in artifacts.iterdir()) == [best.user_attrs["model_artifact"]]
    assert [t.number for t in complete if t.user_attrs.get("model_artifact")] == [best.number]


@pytest.mark.parametrize(("setting", "kept"), [("", 5), ('keep_models = "all"', 7)])
def test_the_default_keeps_the_best_five_and_all_keeps_every_model(
        tmp_path: Path, pg_url: str, setting: str, kept: int) -> None:
    name = "default" if not setting else "all"
    study = write_study(tmp_path, name, n_trials=7, epochs=1, limit=120,
                        family="user_models:tiny", extra_study=setting)
    assert cli("run", str(study), "--storage", pg_url, "--artifacts",
               str(tmp_path / "models")).returncode == 0
    complete = sorted((t for t in _trials(pg_url, name) if t.state.name == "COMPLETE"),
                      key=lambda t: t.value)
    assert len(complete) == 7
    on_disk = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert on_disk == sorted(t.user_attrs["model_artifact"] for t in complete[:kept])


def test_a_model_that_cannot_be_deleted_is_kept_for_a_later_prune(tmp_path: Path,
                                                                   pg_url: str) -> None:
    """A read-only artifact directory (an NFS remount) must not crash the worker in a loop:
    the delete is put off, its record kept, and the next prune that can delete it does."""
    import errno

    from tuner import study as studies
    from tuner.budget import Claimer
    from tuner.retention import Retention
    from tuner.storage import open_storage

    path = write_study(tmp_path, "ro", n_trials=3, epochs=1)
    assert run_tuner("run", str(path), "--storage", pg_url, cwd=tmp_path).returncode == 0
    storage = open_storage(pg_url, heartbeat=False)
    study, _ = studies.load("ro", storage)
    directory = tmp_path / "tuner-artifacts"
    files = sorted(p.name for p in directory.iterdir())
    assert len(files) == 3

    class ReadOnly(optuna.artifacts.FileSystemArtifactStore):
        def remove(self, artifact_id: str) -> None:
            raise OSError(errno.EROFS, "Read-only file system", artifact_id)

    claimer = Claimer(study, storage)
    assert Retention(claimer, ReadOnly(str(directory)), keep=1).prune() == 2  # no crash
    assert sorted(p.name for p in directory.iterdir()) == files
    recorded = [t.user_attrs.get(attrs.MODEL_ARTIFACT) for t in study.get_trials()]
    assert sorted(recorded) == files  # the records stay: the files are still there
    writable = optuna.artifacts.FileSystemArtifactStore(str(directory))
    assert Retention(claimer, writable, keep=1).prune() == 2
    assert len(list(directory.iterdir())) == 1
    storage.engine.dispose()
