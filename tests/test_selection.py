"""Choosing honestly: validation chooses and the test split never does, an epoch budget holds
across workers, the confirm step queues its runs once, and `tuner best --json` keeps its keys.
Real PostgreSQL, real training on tiny data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import REPO, run_tuner, write_study
from test_faults import Worker, _trials, workers  # noqa: F401

BEST_KEYS = {"study", "trial", "val_loss", "val_accuracy", "train_loss",
             "train_loss_training_mode", "gap", "test_loss", "test_accuracy",
             "test_loss_median_of_completed", "test_worse_than_median", "best_epoch",
             "epochs_run", "max_epochs", "params", "keras_val_loss", "host", "gpu", "seconds",
             "model_artifact", "confirmed",
             "curve", "val_loss_turned_up_at"}  # added with the sparklines; none renamed


def _inverted_test_source(tmp_path: Path) -> Path:
    """Digits whose test labels are all shifted by one: the better a model is on validation,
    the worse it is on this test part. Selecting by test would pick the worst trial."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images * 255 / 16).astype(np.uint8)
    y = digits.target
    path = tmp_path / "inverted.npz"
    np.savez(path, x=x[:700], y=y[:700], x_test=x[700:1000], y_test=(y[700:1000] + 1) % 10)
    return path


def test_the_test_split_never_chooses(tmp_path: Path, pg_url: str) -> None:
    source = _inverted_test_source(tmp_path)
    # pruning and early stopping at work too: they see validation only, never the test
    study = write_study(tmp_path, "honest", n_trials=6, epochs=5, source=f"npz:{source}",
                        limit=None, l2="[1e-6, 1e-1]", dropout="[0.0, 0.6]",
                        pruner="median", patience=2, extra_study="pruner_warmup = 0")
    run = run_tuner("run", str(study), "--storage", pg_url, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    everything = _trials(pg_url, "honest")
    for t in everything:  # each epoch reported is the validation curve's, and nothing else
        assert list(t.intermediate_values.values()) == pytest.approx(
            t.user_attrs["curve"]["val_loss"], rel=1e-5)
    assert all("test_loss" not in t.user_attrs for t in everything
               if t.state.name == "PRUNED")  # scored once, and only when complete
    trials = [t for t in everything if t.state.name == "COMPLETE"]
    by_val = min(trials, key=lambda t: t.value)
    by_test = min(trials, key=lambda t: t.user_attrs["test_loss"])
    assert by_val.number != by_test.number  # the data makes them disagree
    best = json.loads(run_tuner("best", "--study", "honest", "--storage", pg_url,
                                "--json").stdout)
    assert best["trial"] == by_val.number
    assert best["test_loss"] == pytest.approx(by_val.user_attrs["test_loss"])
    # the best epoch is the validation curve's minimum, not the test's
    for t in trials:
        curve = t.user_attrs["curve"]["val_loss"]
        assert t.user_attrs["best_epoch"] == int(np.argmin(curve)) + 1
    # and `tuner best` says plainly that this winner is worse on test than the median
    text = run_tuner("best", "--study", "honest", "--storage", pg_url).stdout
    assert best["test_worse_than_median"] is True
    assert "is worse than the median completed trial's" in text


def test_best_json_keys_are_stable(tmp_path: Path, pg_url: str) -> None:
    study = write_study(tmp_path, "keys", n_trials=2, epochs=1)
    assert run_tuner("run", str(study), "--storage", pg_url).returncode == 0
    best = json.loads(run_tuner("best", "--study", "keys", "--storage", pg_url,
                                "--json").stdout)
    assert set(best) == BEST_KEYS
    assert best["test_loss"] is None and best["confirmed"] is None  # no test split, no confirm


def _confirm(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner", "confirm", "--study", "conf",
                           "--storage", url, "--top", "2", "--seeds", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_confirmation_is_queued_once_however_many_ask(tmp_path: Path, pg_url: str) -> None:
    study = write_study(tmp_path, "conf", n_trials=4, epochs=2, pruner="median")
    assert run_tuner("run", str(study), "--storage", pg_url).returncode == 0
    procs = [subprocess.Popen([sys.executable, "-m", "tuner", "confirm", "--study", "conf",
                               "--storage", pg_url, "--top", "2", "--seeds", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum(out.startswith("Queued 4 runs") for out, _ in outputs) == 1
    trials = _trials(pg_url, "conf")
    queued = [t for t in trials if t.state.name == "WAITING"]
    assert len(queued) == 4
    best_two = sorted((t for t in trials if t.state.name == "COMPLETE"),
                      key=lambda t: t.value)[:2]
    assert sorted(t.system_attrs["tuner:confirms"] for t in queued) == sorted(
        [best_two[0].number] * 2 + [best_two[1].number] * 2)
    # queued, none run yet: no winner is confirmed (each has only its search run)
    early = json.loads(run_tuner("best", "--study", "conf", "--storage", pg_url,
                                 "--json").stdout)["confirmed"]
    assert early["winner"] is None and early["pending"] == 4
    # the workers run them next, to the end (never pruned), within the grown budget
    again = run_tuner("run", str(study), "--storage", pg_url)
    assert again.returncode == 0, again.stderr
    assert "8 trials is spent" in again.stdout
    trials = _trials(pg_url, "conf")
    runs = [t for t in trials if "tuner:confirms" in t.system_attrs]
    assert [t.state.name for t in runs] == ["COMPLETE"] * 4
    assert all(t.user_attrs["pruned_at"] is None for t in runs)
    best = json.loads(run_tuner("best", "--study", "conf", "--storage", pg_url,
                                "--json").stdout)
    confirmed = best["confirmed"]
    assert confirmed["pending"] == 0 and len(confirmed["configs"]) == 2
    assert all(len(c["runs"]) == 3 for c in confirmed["configs"])
    means = [c["val_loss_mean"] for c in confirmed["configs"]]
    assert means == sorted(means) and confirmed["winner"] == confirmed["configs"][0]
    # the text says the same, and the export takes the winner's best run
    text = run_tuner("best", "--study", "conf", "--storage", pg_url,
                     "--export-model", str(tmp_path / "winner.keras")).stdout
    winner = confirmed["winner"]
    assert "Confirm step: the top 2 configurations, each retrained with 2 new seeds" in text
    assert (f"Confirmed winner: the configuration of trial #{winner['trial']}, val_loss "
            f"{winner['val_loss_mean']:.4f} ± ") in text, text
    runs_by_number = {t.number: t for t in trials}
    best_run = min((runs_by_number[n] for n in winner["runs"]
                    if runs_by_number[n].user_attrs.get("model_artifact")),
                   key=lambda t: t.value)
    import keras

    from tuner.data import load_arrays
    from tuner.spec import load_spec

    arrays = load_arrays(load_spec(study).data)
    model = keras.models.load_model(tmp_path / "winner.keras")
    val = model.evaluate(arrays.x_val, arrays.y_val, verbose=0, return_dict=True)
    assert val["xent"] == pytest.approx(best_run.value, rel=1e-4)
    repeat = _confirm(pg_url)
    assert repeat.returncode == 0 and "already confirmed" in repeat.stdout


class _PruneFromTrialTwo(optuna.pruners.BasePruner):
    """Prunes every trial numbered 2 or more at the first epoch it is asked."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number >= 2


def test_a_confirm_run_trains_to_the_end_where_a_search_trial_is_pruned(
        tmp_path: Path, pg_url: str) -> None:
    """The same pruner that stops a search trial never stops a confirm run: its mean must be
    of whole runs. Each run retrains its configuration's parameters with another seed."""
    from tuner import confirm
    from tuner import study as studies
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.worker import work

    path = write_study(tmp_path, "whole", n_trials=3, epochs=3, pruner="median", patience=3,
                       extra_study="pruner_warmup = 0")
    storage = open_storage(pg_url)
    studies.create_or_resume(load_spec(path), storage, str(tmp_path / "artifacts"))
    study, spec = studies.load("whole", storage)
    study.pruner = _PruneFromTrialTwo()
    work(storage, study, spec)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert confirm.queue(study, storage, top=2, seeds=1).added == 2
    work(storage, study, spec)
    trials = study.get_trials()
    runs = [t for t in trials if "tuner:confirms" in t.system_attrs]
    assert [t.number for t in runs] == [3, 4]
    for run in runs:
        origin = trials[run.system_attrs["tuner:confirms"]]
        assert run.state.name == "COMPLETE" and run.user_attrs["epochs_run"] == 3
        assert run.params == origin.params and run.value != origin.value


class _PruneAtEpochTwo(optuna.pruners.BasePruner):
    """Prunes every trial that has reported its second epoch."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.last_step is not None and trial.last_step >= 2


def test_a_trial_is_never_pruned_at_its_last_epoch(tmp_path: Path, pg_url: str) -> None:
    """Stopping a trial after its last epoch saves nothing and would throw its result away:
    with 2-epoch trials a pruner that stops everything at epoch 2 stops nothing, with 3-epoch
    trials it stops each after 2."""
    from tuner import study as studies
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.worker import work

    storage = open_storage(pg_url)
    for epochs, state, run in ((2, "COMPLETE", 2), (3, "PRUNED", 2)):
        name = f"last{epochs}"
        path = write_study(tmp_path, name, n_trials=2, epochs=epochs, pruner="median",
                           patience=epochs, extra_study="pruner_warmup = 0")
        studies.create_or_resume(load_spec(path), storage, str(tmp_path / "artifacts"))
        study, spec = studies.load(name, storage)
        study.pruner = _PruneAtEpochTwo()
        work(storage, study, spec)
        trials = study.get_trials()
        assert [t.state.name for t in trials] == [state, state]
        assert [t.user_attrs["epochs_run"] for t in trials] == [run, run]


def test_a_worker_run_in_process_gives_the_collector_back_as_it_found_it(
        tmp_path: Path, pg_url: str) -> None:
    """A worker freezes the heap and collects young objects less often while it trains (its
    trials make objects by the hundred thousand); a program that runs studies in its own
    process, as ``tuner run`` does, gets Python's collector back unchanged afterwards."""
    import gc

    from tuner import study as studies
    from tuner.spec import load_spec
    from tuner.storage import open_storage
    from tuner.worker import YOUNG_THRESHOLD, work

    path = write_study(tmp_path, "collector", n_trials=1, epochs=1)
    storage = open_storage(pg_url)
    studies.create_or_resume(load_spec(path), storage, str(tmp_path / "artifacts"))
    study, spec = studies.load("collector", storage)
    before = gc.get_threshold()
    during: list[tuple[int, ...]] = []
    work(storage, study, spec, progress=lambda _: during.append(gc.get_threshold()))
    assert during and during[0][0] == YOUNG_THRESHOLD != before[0]
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


_CONFIRM_KILLED_HALFWAY = """
import os, sys, optuna
from tuner import confirm
from tuner.storage import ResilientRDBStorage

storage = ResilientRDBStorage(sys.argv[1])
study = optuna.load_study(study_name="half", storage=storage)
add = study.add_trial

def add_then_die(trial):
    add(trial)
    os._exit(9)  # killed (kill -9, a lost node) after queuing its first run

study.add_trial = add_then_die
confirm.queue(study, storage, top=2, seeds=2)
"""


def test_a_confirm_killed_halfway_is_finished_by_the_next(pg_url: str) -> None:
    """`tuner confirm` dies after queuing one of its four runs: the search budget is not
    spent on it meanwhile, and the next `tuner confirm` queues the three missing runs."""
    from tuner import attrs
    from tuner.budget import Claimer, Decision
    from tuner.confirm import queue
    from tuner.storage import ResilientRDBStorage

    storage = ResilientRDBStorage(pg_url)
    study = optuna.create_study(study_name="half", storage=storage)
    study.set_user_attr(attrs.SPEC, {"n_trials": 4, "model": {"epochs": 2}})
    x = optuna.distributions.FloatDistribution(0, 1)
    for i, value in enumerate([0.3, 0.1, 0.2, 0.4]):
        study.add_trial(optuna.trial.create_trial(params={"x": i / 10}, distributions={"x": x},
                                                  value=value))
    died = subprocess.run([sys.executable, "-c", _CONFIRM_KILLED_HALFWAY, pg_url], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert died.returncode == 9, died.stderr
    claimer = Claimer(study, storage)
    usage, budget = claimer.state()
    assert (usage.waiting, budget.n_trials) == (1, 5)  # the one run queued, and its slot
    verdict, taken = claimer.claim_once()
    assert verdict.decision is Decision.TAKE  # the queued run, not a new search trial
    assert attrs.CONFIRMS in storage.get_trial(taken).system_attrs
    finished = queue(study, storage, top=2, seeds=2)
    assert finished.new and (finished.trials, finished.added) == (4, 3)
    runs = [t.system_attrs[attrs.CONFIRMS] for t in study.get_trials()
            if attrs.CONFIRMS in t.system_attrs]
    assert sorted(runs) == [1, 1, 2, 2]
    assert claimer.state()[1].n_trials == 8
    assert not queue(study, storage, top=2, seeds=2).new  # complete now: nothing more


def test_a_confirm_after_the_time_budget_is_spent_still_runs(pg_url: str) -> None:
    """The search's hours are spent: a confirm step's runs start all the same, and only they:
    neither a queued search trial nor a new one does."""
    import time

    from tuner import attrs
    from tuner.budget import Claimer, Decision
    from tuner.confirm import queue
    from tuner.storage import ResilientRDBStorage

    storage = ResilientRDBStorage(pg_url)
    study = optuna.create_study(study_name="late", storage=storage)
    study.set_user_attr(attrs.SPEC, {"time_budget": 60, "model": {"epochs": 2}})
    study.set_user_attr(attrs.CLOCK_STARTED, time.time() - 3600)
    x = optuna.distributions.FloatDistribution(0, 1)
    for i, value in enumerate([0.3, 0.1, 0.2]):
        study.add_trial(optuna.trial.create_trial(params={"x": i / 10}, distributions={"x": x},
                                                  value=value))
    study.enqueue_trial({"x": 0.9})  # a search trial queued again (its worker died)
    claimer = Claimer(study, storage)
    verdict, taken = claimer.claim_once()
    assert (verdict.decision, taken) == (Decision.STOP, None)
    assert verdict.reason == "study time budget of 1m is spent"
    assert queue(study, storage, top=2, seeds=1).added == 2
    confirms = []
    for _ in range(2):
        verdict, taken = claimer.claim_once()
        assert verdict.decision is Decision.TAKE
        confirms.append(storage.get_trial(taken).system_attrs[attrs.CONFIRMS])
    assert sorted(confirms) == [1, 2]  # the top two configurations, not the queued search one
    # While they run, one may die and be queued again: workers wait to run it, not stop.
    verdict, taken = claimer.claim_once()
    assert (verdict.decision, taken) == (Decision.WAIT, None)
    for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.COMPLETE,
                                       [0.05])
    verdict, taken = claimer.claim_once()
    assert (verdict.decision, taken) == (Decision.STOP, None)
    states = [t.state.name for t in study.get_trials()]
    assert states.count("WAITING") == 1 and len(states) == 6  # nothing created


def test_a_queued_search_trial_never_takes_a_confirm_runs_slot(pg_url: str) -> None:
    """The budget was lowered below what the search ran, with a search trial queued again
    (its worker died); then a confirm run is queued on top. The one slot the confirm step
    added is the run's: taking the older search trial would end the study without it."""
    from tuner import attrs
    from tuner.budget import Claimer, Decision
    from tuner.confirm import queue
    from tuner.storage import ResilientRDBStorage

    storage = ResilientRDBStorage(pg_url)
    study = optuna.create_study(study_name="lowered", storage=storage)
    study.set_user_attr(attrs.SPEC, {"n_trials": 1, "model": {"epochs": 2}})
    x = optuna.distributions.FloatDistribution(0, 1)
    for i, value in enumerate([0.3, 0.1]):
        study.add_trial(optuna.trial.create_trial(params={"x": i / 10}, distributions={"x": x},
                                                  value=value))
    study.enqueue_trial({"x": 0.9})  # queued before the confirm run: the older of the two
    assert queue(study, storage, top=1, seeds=1).added == 1
    claimer = Claimer(study, storage)
    verdict, taken = claimer.claim_once()
    assert verdict.decision is Decision.TAKE
    run = storage.get_trial(taken)
    assert run.system_attrs[attrs.CONFIRMS] == 1, run.params
    storage.set_trial_state_values(taken, optuna.trial.TrialState.COMPLETE, [0.1])
    verdict, taken = claimer.claim_once()
    assert (verdict.decision, taken) == (Decision.STOP, None)
    storage.engine.dispose()


def test_a_confirm_run_killed_after_the_time_budget_is_spent_is_run_again(
        tmp_path: Path, pg_url: str, workers: list[Worker]) -> None:  # noqa: F811
    """The search's time is spent and a confirm run's process is killed: the worker's
    restarted process waits for the dead run's heartbeat to lapse, runs it again, and the
    confirm step finishes (it stopped at once instead, and the run stayed RUNNING for ever)."""
    import os
    import signal
    import time

    from tuner import attrs

    study = write_study(tmp_path, "late-kill", n_trials=50, epochs=150, patience=150,
                        family="user_models:tiny", extra_study='time_budget = "2s"')
    assert run_tuner("create", str(study), "--storage", pg_url).returncode == 0
    search = Worker(tmp_path, "search", "--study", "late-kill", "--gpus", "none",
                    storage=pg_url)
    workers.append(search)
    assert search.wait() == 0, search.stderr
    assert "time budget of 2s is spent" in search.stdout
    confirmed = run_tuner("confirm", "--study", "late-kill", "--storage", pg_url, "--top", "1",
                          "--seeds", "1")
    assert confirmed.returncode == 0, confirmed.stderr
    worker = Worker(tmp_path, "confirm", "--study", "late-kill", "--gpus", "none",
                    storage=pg_url)
    workers.append(worker)
    deadline = time.monotonic() + 120
    while True:  # the confirm run, a few epochs in
        runs = [t for t in _trials(pg_url, "late-kill") if attrs.CONFIRMS in t.system_attrs]
        if runs and runs[0].state.name == "RUNNING" and len(runs[0].intermediate_values) >= 3:
            break
        assert time.monotonic() < deadline and worker.proc.poll() is None, worker.stdout
        time.sleep(0.2)
    os.kill(runs[0].user_attrs[attrs.PID], signal.SIGKILL)
    assert worker.wait() == 0, worker.stdout + worker.stderr
    assert "restarting" in worker.stdout
    runs = [t for t in _trials(pg_url, "late-kill") if attrs.CONFIRMS in t.system_attrs]
    assert [t.state.name for t in runs] == ["FAIL", "COMPLETE"], worker.stdout
    assert not [t for t in _trials(pg_url, "late-kill") if t.state.name == "RUNNING"]


def test_confirm_runs_are_not_left_behind_by_the_trials_running_when_they_were_queued(
        pg_url: str) -> None:
    """Confirmed while search trials still run: those finish and count, the user lowers the
    budget, the search's last trials overrun its epochs; the confirm runs start all the same."""
    from tuner import attrs
    from tuner.budget import Claimer, Decision
    from tuner.confirm import queue
    from tuner.storage import ResilientRDBStorage

    storage = ResilientRDBStorage(pg_url)
    for budget in ({"n_trials": 4}, {"epoch_budget": 6}):
        study = optuna.create_study(storage=storage)
        study.set_user_attr(attrs.SPEC, {**budget, "model": {"epochs": 3}})
        claimer = Claimer(study, storage)
        held = []
        for _ in range(3):
            trial = claimer._trial(claimer.claim_once()[1])
            trial.suggest_float("x", 0, 1)
            held.append(trial)
        for number, trial in enumerate(held[:2]):
            for step in (1, 2, 3):
                trial.report(1.0 / step + number, step)
            claimer.tell(trial, 1.0 / 3 + number)
        assert queue(study, storage, top=1, seeds=1).added == 1  # trial #2 still running
        if "n_trials" in budget:
            study.set_user_attr(attrs.SPEC, {"n_trials": 1, "model": {"epochs": 3}})
        for step in (1, 2, 3):  # the last search trial finishes, past the epoch budget too
            held[2].report(0.9, step)
        claimer.tell(held[2], 0.9)
        verdict, taken = claimer.claim_once()
        assert verdict.decision is Decision.TAKE, (budget, verdict)
        assert attrs.CONFIRMS in storage.get_trial(taken).system_attrs


def test_the_confirmed_winner_is_exported_from_a_run_that_kept_its_model(
        tmp_path: Path) -> None:
    """The winning configuration's search trial may have the lowest loss of its runs but
    have lost its model to the best K; a confirm run (which always keeps its model) is
    exported instead of an error."""
    from tuner import attrs
    from tuner.export import export_best_model

    store = tmp_path / "models"
    store.mkdir()
    (store / "run-2").write_bytes(b"a model")
    study = optuna.create_study(study_name="won", storage=f"sqlite:///{tmp_path / 't.db'}")
    study.set_user_attr(attrs.CONFIRM, {"top": 2, "seeds": 1, "configs": [0, 1], "trials": 2})
    x = optuna.distributions.FloatDistribution(0, 1)
    for value, params, model, confirms in ((0.10, 0.1, None, None), (0.12, 0.2, "kept", None),
                                           (0.11, 0.1, "run-2", 0), (0.30, 0.2, "run-3", 1)):
        study.add_trial(optuna.trial.create_trial(
            params={"x": params}, distributions={"x": x}, value=value,
            user_attrs={attrs.MODEL_ARTIFACT: model},
            system_attrs={} if confirms is None else {attrs.CONFIRMS: confirms}))
    exported = export_best_model(study, tmp_path / "best.keras", str(store))
    assert exported.read_bytes() == b"a model"  # run #2 of configuration #0, not #0 itself


@pytest.mark.slow
def test_the_epoch_budget_holds_across_two_workers(tmp_path: Path, pg_url: str,
                                                   workers: list[Worker]) -> None:  # noqa: F811
    budget, epochs = 24, 3
    study = write_study(tmp_path, "epochs", n_trials=1, epochs=epochs, pruner="none",
                        family="user_models:tiny", patience=epochs)
    text = study.read_text().replace("n_trials = 1\n", f"epoch_budget = {budget}\n")
    study.write_text(text)
    assert run_tuner("create", str(study), "--storage", pg_url).returncode == 0
    for name in ("a", "b"):
        workers.append(Worker(tmp_path, name, "--study", "epochs", "--gpus", "none",
                              storage=pg_url))
    assert [w.wait() for w in workers] == [0, 0], [w.stderr for w in workers]
    trials = _trials(pg_url, "epochs")
    used = sum(len(t.intermediate_values) for t in trials)
    assert budget <= used < budget + 2 * epochs  # only trials already running went past it
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert all(f"study budget of {budget} epochs is spent" in w.stdout for w in workers)
    print(f"\n[epoch budget {budget}, 2 workers] {len(trials)} trials, {used} epochs trained")


def test_run_has_a_timeout(tmp_path: Path) -> None:
    study = write_study(tmp_path, "timed", n_trials=50, epochs=1)
    run = run_tuner("run", str(study), "--timeout", "0.5", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Done: reached --timeout 0.5s." in run.stdout
    storage = f"sqlite:///{tmp_path / 'tuner.db'}"
    assert len(optuna.load_study(study_name="timed", storage=storage).trials) == 1
