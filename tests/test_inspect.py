"""`tuner status`, `tuner trials` and `tuner importance` through the real CLI, on studies
built with Optuna's own API (finished, pruned, failed, queued and running trials, heartbeats)
in the embedded SQLite file and in the real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import TUNER, cli, write_study
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from tuner import study as studies
from tuner.spec import load_spec
from tuner.storage import open_storage

DISTS = {"dropout": FloatDistribution(0.0, 0.5), "l2": FloatDistribution(1e-6, 1e-2, log=True),
         "augment": FloatDistribution(0.0, 0.5)}


def make_study(url: str, directory: Path, name: str = "look", *, n_trials: int = 40,
               complete: int = 12, running: bool = True, best_l2: float | None = None
               ) -> optuna.Study:
    """A tuner study holding ``complete`` finished trials, 2 pruned, 1 failed, 1 queued and
    (if ``running``) one running trial on host node-a, GPU 1, at epoch 3 with a heartbeat."""
    spec = load_spec(write_study(directory, name, n_trials=n_trials, epochs=5))
    storage = open_storage(url, heartbeat=False)
    study, _ = studies.create_or_resume(spec, storage, str(directory / "artifacts"))
    rng = random.Random(1)
    trials = []
    for i in range(complete):
        params = {"dropout": rng.uniform(0.1, 0.5), "l2": 10 ** rng.uniform(-5, -3),
                  "augment": rng.uniform(0.1, 0.4)}
        value = 0.3 + params["dropout"] + 0.001 * i
        if best_l2 is not None and i == complete - 1:
            params["l2"], value = best_l2, 0.1
        trials.append(create_trial(
            params=params, distributions=DISTS, value=value,
            intermediate_values={1: value + 0.2, 2: value + 0.1, 3: value},
            user_attrs={"host": "node-b", "gpu": "0", "val_accuracy": 0.9, "gap": 0.05,
                        "epochs_run": 3, "pruned_at": None, "seconds": 12.5}))
    for pruned_value in (1.5, 1.7):
        trials.append(create_trial(
            params={"dropout": 0.45, "l2": 1e-3, "augment": 0.2}, distributions=DISTS,
            state=TrialState.PRUNED, intermediate_values={1: pruned_value, 2: pruned_value + 1},
            user_attrs={"host": "node-b", "epochs_run": 2, "pruned_at": 2, "seconds": 4.0}))
    trials.append(create_trial(
        params={"dropout": 0.2, "l2": 1e-3, "augment": 0.2}, distributions=DISTS,
        state=TrialState.FAIL, user_attrs={"host": "node-c", "fail_reason": "loss became nan"}))
    study.add_trials(trials)
    if running:
        trial = study.ask(DISTS)
        trial.set_user_attr("host", "node-a")
        trial.set_user_attr("gpu", "1")
        for epoch in (1, 2, 3):
            trial.report(1.0 / epoch, epoch)
        storage.record_heartbeat(trial._trial_id)
    study.enqueue_trial({"dropout": 0.3, "l2": 1e-4, "augment": 0.1})
    return study


def test_status_shows_counts_best_budget_and_running_trials(tmp_path: Path, any_url: str) -> None:
    study = make_study(any_url, tmp_path)
    proc = cli("status", "--study", "look", "--storage", any_url, "--json")
    assert proc.returncode == 0, proc.stderr
    (s,) = json.loads(proc.stdout)["studies"]
    assert s["states"] == {"running": 1, "complete": 12, "pruned": 2, "failed": 1,
                           "waiting": 1}
    assert s["n_trials"] == 40 and s["left"] == 40 - 12 - 2
    best = study.best_trial
    assert s["best_trial"] == best.number
    assert s["best_value"] == pytest.approx(best.value)
    found = best.datetime_complete.astimezone()
    from datetime import datetime

    assert abs((datetime.fromisoformat(s["best_found_at"]) - found).total_seconds()) < 1
    mine = s["running"]
    assert len(mine) == 1 and mine[0]["host"] == "node-a" and mine[0]["trial"] == 15
    assert mine[0]["gpu"] == "1" and mine[0]["epoch"] == 3 and mine[0]["max_epochs"] == 5
    assert mine[0]["heartbeat_age_s"] is not None and 0 <= mine[0]["heartbeat_age_s"] < 120

    text = cli("status", "--storage", any_url)
    assert text.returncode == 0, text.stderr
    assert "Study 'look': 40 trials budget, 26 left" in text.stdout
    assert "12 complete, 2 pruned, 1 failed" in text.stdout
    assert f"(trial #{best.number})" in text.stdout
    line = next(ln for ln in text.stdout.splitlines() if "node-a" in ln)
    assert line.split()[:4] == [f"#{mine[0]['trial']}", "node-a", "1", "3/5"]
    assert line.rstrip().endswith("ago")


def test_status_of_every_study_and_of_none(tmp_path: Path, any_url: str) -> None:
    empty = cli("status", "--storage", any_url)
    if any_url.startswith("sqlite"):  # a read-only verb never creates the file
        assert empty.returncode == 2 and "no database at" in empty.stderr, empty.stderr
    else:
        assert empty.returncode == 0 and "No studies in" in empty.stdout, empty.stderr
    make_study(any_url, tmp_path, "first", complete=3, running=False)
    make_study(any_url, tmp_path, "second", complete=0, running=False)
    proc = cli("status", "--storage", any_url, "--json")
    assert proc.returncode == 0, proc.stderr
    by_name = {s["study"]: s for s in json.loads(proc.stdout)["studies"]}
    assert set(by_name) == {"first", "second"}
    assert by_name["second"]["best_value"] is None and by_name["second"]["running"] == []
    text = cli("status", "--storage", any_url).stdout
    assert "no completed trial yet" in text and "Study 'first'" in text


def test_status_imports_no_tensorflow(tmp_path: Path, any_url: str) -> None:
    make_study(any_url, tmp_path, complete=3)
    proc = subprocess.run([*TUNER, "status", "--study", "look", "--storage", any_url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    code = ("import sys; from tuner.cli import main; rc = main(['status', '--storage', "
            f"{any_url!r}]); bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras', 'sklearn')); print('LOADED', bad); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout[-500:]
    times = subprocess.run([*TUNER[:1], "-X", "importtime", *TUNER[1:], "status", "--storage",
                            any_url], capture_output=True, text=True, timeout=120)
    assert times.returncode == 0
    imported = {ln.split("|")[-1].strip() for ln in times.stderr.splitlines() if "|" in ln}
    assert "tuner.inspect" in imported
    assert not {m for m in imported if m.split(".")[0] in ("tensorflow", "keras")}


def test_unknown_study_is_a_user_error(tmp_path: Path, any_url: str) -> None:
    make_study(any_url, tmp_path, complete=1, running=False)
    for verb in (["status"], ["trials"], ["importance"], ["best"]):
        proc = cli(*verb, "--study", "lok", "--storage", any_url)
        assert proc.returncode == 2, (verb, proc.stderr)
        assert proc.stderr.strip() == "tuner: error: unknown study 'lok': did you mean 'look'?"


def test_the_line_a_pruned_trial_ends_with_shows_its_best_epoch(tmp_path: Path,
                                                                 any_url: str) -> None:
    """`tuner run` and `tuner worker` print each finished trial; for a pruned one Optuna keeps
    the last epoch's value, but the line (as `tuner trials`) shows its best validation loss."""
    from tuner.worker import _outcome

    study = make_study(any_url, tmp_path)
    storage = open_storage(any_url, heartbeat=False)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert [_outcome(storage, study._study_id, t, 1.0, "").value for t in pruned] == [1.5, 1.7]


def test_trials_in_three_formats(tmp_path: Path, any_url: str) -> None:
    study = make_study(any_url, tmp_path)
    n = len(study.trials)
    as_json = cli("trials", "--study", "look", "--storage", any_url, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    keys = ["number", "state", "dropout", "l2", "augment", "val_loss", "val_accuracy",
            "train_loss", "gap", "test_loss", "test_accuracy", "best_epoch", "epochs_run",
            "pruned_at", "confirms", "host", "started_at", "ended_at", "seconds", "fail_reason"]
    assert len(rows) == n and all(list(r) == keys for r in rows)
    by_state = {r["state"]: r for r in rows}
    assert set(by_state) == {"COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"}
    best = study.best_trial
    assert rows[best.number]["val_loss"] == pytest.approx(best.value)
    assert rows[best.number]["l2"] == pytest.approx(best.params["l2"])
    pruned = [r for r in rows if r["state"] == "PRUNED"]
    assert [r["val_loss"] for r in pruned] == [1.5, 1.7]  # their best epoch, not the last
    assert [r["pruned_at"] for r in pruned] == [2, 2]
    failed = by_state["FAIL"]
    assert failed["fail_reason"] == "loss became nan" and failed["host"] == "node-c"

    as_csv = cli("trials", "--study", "look", "--storage", any_url, "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(parsed) == n and list(parsed[0]) == keys
    assert float(parsed[best.number]["val_loss"]) == pytest.approx(best.value)
    assert parsed[best.number]["fail_reason"] == ""

    table = cli("trials", "--study", "look", "--storage", any_url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    shown = ["number", "state", "dropout", "l2", "augment", "val_loss", "val_accuracy", "gap",
             "epochs_run", "pruned_at", "host", "seconds", "fail_reason"]  # empty ones left out
    assert lines[0].split() == shown
    assert len(lines) == n + 1
    # aligned: every row's right-aligned numeric columns end at the header's column ends
    end = lines[0].index("val_loss") + len("val_loss")
    for line in lines[1:]:
        assert line[end - 1] != " " and (len(line) == end or line[end] == " "), line
    assert any(ln.rstrip().endswith("loss became nan") for ln in lines)


def test_trials_of_a_study_without_trials(tmp_path: Path, any_url: str) -> None:
    spec_path = write_study(tmp_path, "fresh")
    assert cli("create", str(spec_path), "--storage", any_url).returncode == 0
    proc = cli("trials", "--study", "fresh", "--storage", any_url, "--format", "json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stderr
    proc = cli("trials", "--study", "fresh", "--storage", any_url)
    assert proc.returncode == 0 and proc.stdout.strip() == "(no trials yet)"


def test_importance_and_a_range_edge(tmp_path: Path, any_url: str) -> None:
    make_study(any_url, tmp_path, complete=20, best_l2=9.8e-3)
    proc = cli("importance", "--study", "look", "--storage", any_url, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["importances"]) == {"dropout", "l2", "augment"}
    assert sum(report["importances"].values()) == pytest.approx(1.0)
    assert report["complete_trials"] == 20
    ranges = {r["param"]: r for r in report["ranges"]}
    assert ranges["l2"]["pinned"] == "high" and ranges["l2"]["log"] is True
    assert ranges["l2"]["position"] > 0.95
    assert ranges["l2"]["advice"] == "pinned at the high edge: widen the range in [search] l2"
    assert ranges["dropout"]["pinned"] is None and ranges["dropout"]["advice"] is None
    text = cli("importance", "--study", "look", "--storage", any_url)
    assert text.returncode == 0, text.stderr
    assert "widen the range in [search] l2" in text.stdout
    assert "fANOVA over 20 completed trials" in text.stdout


def test_importance_with_too_few_trials_says_so(tmp_path: Path, any_url: str) -> None:
    make_study(any_url, tmp_path, complete=1, running=False)
    proc = cli("importance", "--study", "look", "--storage", any_url)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first == ("Parameter importances: importances need at least 2 completed trials; "
                     "study 'look' has 1")
    assert "Traceback" not in proc.stderr


def test_a_curve_turns_up_only_where_it_rises() -> None:
    from tuner.figures import turned_up_at

    assert turned_up_at([0.3, 0.1, 0.2]) == 3
    assert turned_up_at([0.3, 0.1, 0.1, 0.1]) is None  # a plateau at its lowest: still there
    assert turned_up_at([0.3, 0.0, 0.0, 0.2]) == 4  # rose after the plateau
    assert turned_up_at([0.3, 0.2, 0.1]) is None


def test_what_the_commands_print_at_the_edges() -> None:
    """A loss column that stays four decimals, a study without knobs, one configuration
    confirmed, and a time budget spent while workers still run."""
    from tuner import render
    from tuner.budget import Budget, Usage
    from tuner.confirm import Queued

    summary = {"study": "s", "trial": 0, "val_loss": 0.1, "val_accuracy": 0.9,
               "train_loss": 0.1003, "gap": -0.000299, "test_loss": None, "best_epoch": 3,
               "epochs_run": 5, "max_epochs": 5, "params": {},
               "test_worse_than_median": False}
    assert "  gap            -0.0003   val_loss" in render.best(summary)
    fixed = {"importances": {}, "best_trial": 0, "ranges": []}
    assert render.importance(fixed).splitlines() == [
        "Parameter importances: every knob is fixed in the study file, so none to weigh",
        "Best trial #0: every knob is fixed in the study file, so no range to widen."]
    spent = render.no_completed_trial("s", "export", ["PRUNED", "FAIL", "PRUNED"])
    assert "nothing to export; its 2 trials pruned and 1 failed are all it has run" in spent
    assert "start a worker again (`tuner worker --study s`)" in spent  # a budget may be left
    assert "wait for a worker" in render.no_completed_trial("s", "show", ["FAIL", "RUNNING"])
    one = render.confirm_queued("s", Queued(1, 2, [4], 2, added=2), (1, 2))
    assert "Queued 2 runs in study" in one
    assert "(start one with `tuner worker --study s` if none is running)" in one
    elsewhere = render.confirm_queued("s", Queued(1, 2, [4], 2, added=2), (1, 2),
                                      storage_flags="--storage postgresql://db/x")
    assert "`tuner worker --study s --storage postgresql://db/x` if none" in elsewhere
    assert "the best configuration (trial #4), 2 new seeds." in one
    single = render.confirm_queued("s", Queued(1, 1, [4], 1, added=1), (1, 1))
    assert single.startswith("Queued 1 run in study 's': the best configuration (trial #4), "
                             "1 new seed. The study's budget grew by 1 trial. Workers run")
    timed = render.confirm_queued("s", Queued(2, 2, [4, 5], 4, added=4), (2, 2),
                                  (False, 15, True))
    assert ("2 new seeds each. The study's budget grew by 60 epochs. They start even once its "
            "time budget is spent. Workers run them next") in timed
    assert "2 runs of trial #4 were queued before (2 seeds)" in render.confirm_queued(
        "s", Queued(1, 2, [4], 2), (1, 2))
    again = render.confirm_queued("s", Queued(1, 2, [4], 2), (3, 5))
    assert again.endswith("--top 3 --seeds 5 were not used: a study is confirmed once (give "
                          "the search a new study name to confirm afresh).")
    assert "not used" not in render.confirm_queued("s", Queued(1, 2, [4], 2), (1, 2))
    spent = Budget(seconds=15, clock_started=1000.0).progress(Usage(), now=1026.0)
    assert spent == "0 trials finished, 15s of 15s"


def test_status_of_an_unreachable_database_is_one_line_without_the_password() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    proc = cli("status", "--storage", f"postgresql+psycopg2://postgres:s3cret@127.0.0.1:{port}/x")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("tuner: error: cannot open storage postgresql+psycopg2://"
                                  "postgres:***@127.0.0.1:")
    assert "s3cret" not in proc.stderr + proc.stdout
