"""The main job end to end: `tuner run` in a subprocess, read back through Optuna's own API
and the `optuna` CLI, on the embedded SQLite file and on the real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import TUNER, run_tuner, write_study

pytestmark = pytest.mark.slow


def test_run_then_best_then_optuna_cli(tmp_path: Path, any_url: str) -> None:
    path = write_study(tmp_path, "e2e", n_trials=4, epochs=3, pruner="median")
    result = run_tuner("run", str(path), "--storage", any_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Created study 'e2e'" in out
    progress = [line for line in out.splitlines() if line.startswith("trial ")]
    assert len(progress) == 4 and all("val_loss" in line and "best" in line for line in progress)
    assert "Best trial of study 'e2e'" in out

    study = optuna.load_study(study_name="e2e", storage=any_url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 4
    for t in finished:  # per-epoch unpenalized val_loss: learning curves for the dashboard
        assert sorted(t.intermediate_values) == list(range(1, t.user_attrs["epochs_run"] + 1))
    assert set(study.best_trial.params) == {"dropout", "l2", "augment"}

    best = run_tuner("best", "--study", "e2e", "--storage", any_url, "--json", cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    summary = json.loads(best.stdout)
    assert summary["trial"] == study.best_trial.number
    assert summary["val_loss"] == pytest.approx(study.best_value)
    for key in ("val_accuracy", "train_loss", "gap", "best_epoch", "epochs_run", "params"):
        assert summary[key] is not None
    assert summary["gap"] == pytest.approx(summary["val_loss"] - summary["train_loss"])
    text = run_tuner("best", "--study", "e2e", "--storage", any_url, cwd=tmp_path).stdout
    assert "dropout" in text and "l2" in text and "gap" in text

    optuna_cli = Path(sys.executable).with_name("optuna")
    cli = subprocess.run([str(optuna_cli), "best-trial", "--study-name", "e2e", "--storage",
                          any_url, "-f", "json"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["number"] == study.best_trial.number


def test_rerun_resumes_the_same_study(tmp_path: Path, pg_url: str) -> None:
    path = write_study(tmp_path, "resume", n_trials=3, epochs=1)
    first = run_tuner("run", str(path), "--storage", pg_url, "--n-trials", "1")
    assert first.returncode == 0, first.stderr
    second = run_tuner("run", str(path), "--storage", pg_url)
    assert second.returncode == 0, second.stderr
    assert "1 of 3 trials finished, resuming" in second.stdout
    assert optuna.get_all_study_names(storage=pg_url) == ["resume"]
    study = optuna.load_study(study_name="resume", storage=pg_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


def test_interrupted_run_resumes_and_keeps_finished_trials(tmp_path: Path, pg_url: str) -> None:
    """Ctrl-C in the middle of the second trial: the first stays, the second is given back
    (reason ``interrupted``) and the next `tuner run` trains its parameters again."""
    path = write_study(tmp_path, "ctrlc", n_trials=3, epochs=8, patience=8,
                       family="user_models:slow")
    proc = subprocess.Popen([*TUNER, "run", str(path), "--storage", pg_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1",
                                 "PYTHONPATH": str(Path(__file__).parent)})
    deadline = time.monotonic() + 300
    while not any(t.number == 1 and t.state.name == "RUNNING" and t.intermediate_values
                  for t in _trials(pg_url, "ctrlc", missing_ok=True)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "run the same command to resume" in out
    trials = _trials(pg_url, "ctrlc")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert trials[1].user_attrs["fail_reason"] == "interrupted"
    # what it trained before the signal is on record (it counts against an epoch budget)
    assert trials[1].user_attrs["epochs_run"] == len(trials[1].intermediate_values) >= 1
    assert trials[2].params == trials[1].params  # queued again

    again = run_tuner("run", str(path), "--storage", pg_url,
                      env={"PYTHONPATH": str(Path(__file__).parent)})
    assert again.returncode == 0, again.stderr
    trials = _trials(pg_url, "ctrlc")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params == trials[1].params


def _trials(url: str, name: str, missing_ok: bool = False) -> list[optuna.trial.FrozenTrial]:
    # One storage a call, its connections closed at once: polled in a loop, storages left to
    # the garbage collector held the server's connections until it ran out of them.
    storage = optuna.storages.RDBStorage(url)
    try:
        if missing_ok and name not in optuna.get_all_study_names(storage=storage):
            return []
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path: Path,
                                                            sqlite_url: str) -> None:
    path = write_study(tmp_path, "nan", n_trials=2, epochs=1, family="user_models:diverges")
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    result = run_tuner("run", str(path), "--storage", sqlite_url, "--n-trials", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("FAIL") == 2 and "loss became nan at epoch 1" in result.stdout
    study = optuna.load_study(study_name="nan", storage=sqlite_url)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert "nan" in study.trials[0].user_attrs["fail_reason"]
