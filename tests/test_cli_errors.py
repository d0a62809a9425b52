"""Every user mistake: one line naming what and where, exit 2, no traceback, nothing written.
Storage trouble: one line, exit 1, password masked. In-process through ``tuner.cli.main``;
one real process checks what a terminal sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import cli, run_tuner, write_study


def assert_one_line(result, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tuner: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0]


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(body)
    return path


BAD_FILES = {
    "malformed": ("[study\nname='x'", "not valid TOML"),
    "unknown key": ("[study]\nname='x'\n[search]\ndropuot=[0,0.5]", "dropuot: unknown key"),
    "low > high": ("[study]\nname='x'\n[search]\ndropout=[0.6,0.1]", "low 0.6 is greater than"),
    "dropout >= 1": ("[study]\nname='x'\n[search]\ndropout=[0.0,1.0]", "[search] dropout: 1.0"),
    "log l2 <= 0": ("[study]\nname='x'\n[search]\nl2=[0.0,0.1]", "must be > 0 on a log scale"),
    "sampler": ("[study]\nname='x'\nsampler='bayes'", "unknown sampler 'bayes'"),
    "pruner": ("[study]\nname='x'\npruner='asha'", "unknown pruner 'asha'"),
    "family": ("[study]\nname='x'\n[model]\nfamily='vgg'", "unknown model family 'vgg'"),
    "source": ("[study]\nname='x'\n[data]\nsource='cifar'", "unknown data source 'cifar'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_study_file(tmp_path: Path, case: str) -> None:
    body, needle = BAD_FILES[case]
    path = write(tmp_path, body)
    db = tmp_path / "tuner.db"
    result = cli("run", str(path), "--storage", f"sqlite:///{db}")
    assert_one_line(result, 2, str(path), needle)
    assert not db.exists()  # nothing was written


def test_missing_study_file(tmp_path: Path) -> None:
    result = cli("run", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert_one_line(result, 2, "nope.toml", "study file not found")
    assert not (tmp_path / "tuner.db").exists()


def npz_study(tmp_path: Path, **arrays: np.ndarray) -> Path:
    data = tmp_path / "data.npz"
    if arrays:
        np.savez(data, **arrays)
    return write_study(tmp_path, source=f"npz:{data}")


@pytest.mark.parametrize(("arrays", "needle"), [
    ({}, "file not found"),
    ({"images": np.zeros((4, 8, 8))}, "expected arrays x_train, y_train, x_val, y_val"),
    ({"x": np.zeros((4, 8, 8)), "y": np.zeros(5, dtype=int)}, "do not match images x"),
    ({"x_train": np.zeros((4, 8, 8)), "y_train": np.zeros(4, dtype=int),
      "x_val": np.zeros((3, 8, 8)), "y_val": np.zeros(2, dtype=int)}, "labels y_val"),
    ({"x": np.zeros((4, 8)), "y": np.zeros(4, dtype=int)}, "must hold images"),
    ({"x_train": np.zeros((4, 8, 8)), "y_train": np.zeros(4, dtype=int),
      "x_val": np.zeros((3, 10, 10)), "y_val": np.zeros(3, dtype=int)},
     "x_val holds images of shape (10, 10, 1) but x_train of shape (8, 8, 1)"),
    ({"x": np.zeros((4, 8, 8, 3)), "y": np.zeros(4, dtype=int),
      "x_test": np.zeros((2, 8, 8)), "y_test": np.zeros(2, dtype=int)}, "x_test holds images"),
    ({"x": np.zeros((4, 8, 8)), "y": np.zeros(4, dtype=int), "x_test": np.zeros((2, 8, 8))},
     "has x_test but not y_test; a test part needs both"),
    ({"x": np.full((4, 8, 8), 4000, dtype=np.uint16), "y": np.zeros(4, dtype=int)},
     "x holds values from 4000 to 4000; expected pixels 0-255"),
    ({"x": np.zeros((4, 8, 8)), "y": np.arange(4) % 2, "x_test": np.zeros((2, 8, 8)),
      "y_test": np.array([1, 2])}, "y_test has labels [2] that no training"),
], ids=["missing", "no arrays", "x/y mismatch", "val mismatch", "not images", "val shape",
        "test shape", "x_test alone", "16-bit pixels", "unseen test label"])
def test_bad_npz_source(tmp_path: Path, arrays: dict, needle: str) -> None:
    path = npz_study(tmp_path, **arrays)
    result = cli("create", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert_one_line(result, 2, "[data] source npz:", needle)
    assert not (tmp_path / "x.db").exists()


def test_bad_input_writes_nothing_to_postgres(tmp_path: Path, pg_url: str) -> None:
    path = write(tmp_path, BAD_FILES["low > high"][0])
    assert_one_line(cli("create", str(path), "--storage", pg_url), 2, "low 0.6")
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_url)
    assert "studies" not in sqlalchemy.inspect(engine).get_table_names()
    engine.dispose()


def test_a_changed_study_file_says_what_changed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert cli("create", str(write_study(tmp_path, "same", epochs=2)), "--storage",
               url).returncode == 0
    changed = write_study(tmp_path, "same", epochs=16, n_trials=9, dropout="[0.1, 0.5]")
    result = cli("create", str(changed), "--storage", url)
    assert_one_line(result, 2, "study 'same' already exists with another [model] epochs (16, "
                    "stored 2), [search] dropout", "only n_trials, epoch_budget")
    assert "n_trials" not in result.stderr.split(";")[0]  # a budget may change
    timed = write_study(tmp_path, "same", epochs=2, extra_study='time_budget = "2h"')
    result = cli("create", str(timed), "--storage", url)
    assert result.returncode == 0, result.stderr
    assert "Changed: time_budget unset → 2h;" in result.stdout
    timed.write_text(timed.read_text().replace('"2h"', '"90s"'))
    assert "Changed: time_budget 2h → 1m 30s;" in cli("create", str(timed), "--storage",
                                                       url).stdout


def test_an_artifact_directory_that_cannot_be_used(tmp_path: Path) -> None:
    """`tuner run` checks --artifacts before it creates anything; `tuner create` does not (the
    path may exist only on the GPU nodes), and a worker then names where the path came from."""
    study = write_study(tmp_path, "art")
    result = cli("run", str(study), "--artifacts", "/proc/nope", cwd=tmp_path)
    assert_one_line(result, 2, "--artifacts: cannot use /proc/nope")
    assert not (tmp_path / "tuner.db").exists()
    assert cli("create", str(study), "--artifacts", "/proc/nope", cwd=tmp_path).returncode == 0
    worker = run_tuner("worker", "--study", "art", "--gpus", "none", cwd=tmp_path)
    assert_one_line(worker, 1, "artifact directory /proc/nope (recorded when the study was "
                    "created; --artifacts DIR or $TUNER_ARTIFACTS overrides it)")


def test_a_model_module_that_does_not_import_runs_no_trial(tmp_path: Path) -> None:
    study = write_study(tmp_path, "mod", family="nosuchmod:wide")
    run = run_tuner("run", str(study), cwd=tmp_path)
    assert_one_line(run, 2, "[model] family: cannot import 'nosuchmod'")
    assert not (tmp_path / "tuner.db").exists()
    assert cli("create", str(study), cwd=tmp_path).returncode == 0  # may import on the nodes
    # the same bad setting, the same exit 2: a Kubernetes Job fails at once, not retried
    worker = run_tuner("worker", "--study", "mod", "--gpus", "none", cwd=tmp_path)
    assert_one_line(worker, 2, "[cpu] [model] family: cannot import 'nosuchmod'")
    # two children in a worker, both stopped by it: still 2, and each says why
    two = run_tuner("worker", "--study", "mod", "--gpus", "none", "--trials-per-gpu", "2",
                    cwd=tmp_path)
    assert two.returncode == 2 and "Traceback" not in two.stderr, two.stderr
    assert optuna.load_study(study_name="mod", storage=f"sqlite:///{tmp_path / 'tuner.db'}"
                             ).trials == []


def test_unknown_study_for_best(tmp_path: Path, pg_url: str) -> None:
    run = cli("create", str(write_study(tmp_path, "digits-x")), "--storage", pg_url)
    assert run.returncode == 0, run.stderr
    result = cli("best", "--study", "digits-y", "--storage", pg_url)
    assert_one_line(result, 2, "unknown study 'digits-y'", "did you mean 'digits-x'")
    assert len(optuna.get_all_study_names(storage=pg_url)) == 1


def test_hints_name_the_database_they_were_about(tmp_path: Path, pg_url: str) -> None:
    """A hint pasted as it is must reach the same database, not the default SQLite file."""
    assert cli("create", str(write_study(tmp_path, "hinted")), "--storage",
               pg_url).returncode == 0
    flags = f"--storage {pg_url}"
    result = cli("best", "--study", "hinted", "--storage", pg_url)
    assert_one_line(result, 1, f"start a worker (`tuner worker --study hinted {flags}`)")
    result = cli("best", "--study", "hinted", "--export-model", str(tmp_path / "m.keras"),
                 "--storage", pg_url)
    assert_one_line(result, 1, "nothing to export", f"--study hinted {flags}`")
    result = cli("status", "--study", "zzzz", "--storage", pg_url)
    assert_one_line(result, 2, f"unknown study 'zzzz' in {pg_url}, which holds ",
                    "another database: --storage URL or $TUNER_STORAGE")
    # the default database needs no flags: the command is pasted as it is
    assert cli("create", str(write_study(tmp_path, "local")), cwd=tmp_path).returncode == 0
    result = cli("best", "--study", "local", cwd=tmp_path)
    assert_one_line(result, 1, "start a worker (`tuner worker --study local`)")


def test_best_on_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    result = cli("best", "--study", "x", cwd=tmp_path)
    assert_one_line(result, 2, "no database at sqlite:///tuner.db")
    assert not (tmp_path / "tuner.db").exists()


def test_no_verb_or_a_misspelled_one_names_the_verbs(tmp_path: Path) -> None:
    result = cli(cwd=tmp_path)
    assert_one_line(result, 2, "say what to do: tuner run | create | worker", "`tuner --help`")
    assert "tuner: error: tuner" not in result.stderr  # the prefix once
    assert_one_line(cli("bset", cwd=tmp_path), 2, "unknown verb 'bset'; did you mean 'best'?")
    assert_one_line(cli("frobnicate", cwd=tmp_path), 2, "verbs: run, create, worker, status")


def test_bad_flag_is_one_line(tmp_path: Path) -> None:
    result = cli("worker", "--study", "x", "--n-trials", "-3", cwd=tmp_path)
    assert_one_line(result, 2, "--n-trials", "must be positive")
    result = cli("worker", "--study", "x", "--timeout", "30q", cwd=tmp_path)
    assert_one_line(result, 2, "--timeout: expected seconds or a duration like 90s, 30m, 8h")
    result = cli("worker", "--study", "x", "--timeout", "0m", cwd=tmp_path)
    assert_one_line(result, 2, "--timeout: must be more than 0 seconds, got 0m")


def test_a_flag_the_verb_does_not_take_points_at_the_verbs_help(tmp_path: Path) -> None:
    result = cli("best", "--study", "x", "--top", "3", cwd=tmp_path)
    assert_one_line(result, 2, "unrecognized arguments: --top 3 (see `tuner best --help`)")


def test_timeout_takes_a_duration_as_the_study_file_does() -> None:
    from tuner.cli import build_parser

    opts = build_parser().parse_args(["worker", "--study", "x", "--timeout", "30m"])
    assert opts.timeout == 1800.0


def test_unreachable_database_masks_the_password(tmp_path: Path) -> None:
    path = write_study(tmp_path)
    url = "postgresql+psycopg2://alice:S3cretPW@127.0.0.1:1/nodb"
    result = run_tuner("create", str(path), "--storage", url)
    assert_one_line(result, 1, "cannot open storage postgresql+psycopg2://alice:***@127.0.0.1:1")
    assert "S3cretPW" not in result.stderr + result.stdout


def test_malformed_url(tmp_path: Path) -> None:
    result = cli("create", str(write_study(tmp_path)), "--storage", "not a url")
    assert_one_line(result, 2, "malformed storage URL")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_url_without_a_driver_uses_psycopg2(tmp_path: Path, pg_url: str, scheme: str) -> None:
    """The URL most users copy (SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which
    is not installed; postgres:// is what hosting services hand out)."""
    url = pg_url.replace("postgresql+psycopg2://", f"{scheme}://")
    assert cli("create", str(write_study(tmp_path, "bare")), "--storage", url).returncode == 0
    status = cli("status", "--storage", url)
    assert status.returncode == 0 and "bare" in status.stdout, status.stderr


def test_a_database_tuner_does_not_run_on_is_one_line() -> None:
    result = cli("status", "--storage", "mysql+pymysql://root@127.0.0.1/test")
    assert_one_line(result, 2, "mysql is not supported", "postgresql+psycopg2://")


def test_a_driver_tuner_does_not_install_is_one_line() -> None:
    result = cli("best", "--study", "x", "--storage", "postgresql+psycopg://postgres@127.0.0.1/test")
    assert_one_line(result, 2, "the driver 'postgresql+psycopg' is not installed",
                    "postgresql+psycopg2://")


def test_an_sqlite_url_naming_a_folder_or_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = cli("status", "--storage", f"sqlite:///{tmp_path}")
    assert_one_line(result, 2, f"storage URL: {tmp_path} is a folder; name a database file in "
                    f"it, as in sqlite:///{tmp_path / 'tuner.db'}")
    missing = tmp_path / "nope" / "tuner.db"
    result = cli("run", str(write_study(tmp_path)), "--storage", f"sqlite:///{missing}")
    assert_one_line(result, 2, f"the folder {missing.parent} does not exist")
    assert not missing.parent.exists()
    # three slashes before an absolute path: a relative one, and a hint at the fourth
    meant = tmp_path / "studies.db"
    result = cli("status", "--storage", f"sqlite://{meant}", cwd=tmp_path)
    assert_one_line(result, 2, f"for {meant} write four slashes: sqlite:///{meant}")


def test_status_on_a_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text("[study]\nname = 'x'\n")
    for study in ([], ["--study", "x"]):
        result = cli("status", *study, "--storage", "sqlite:///study.toml", cwd=tmp_path)
        assert_one_line(result, 1, "cannot open storage sqlite:///study.toml: file is not a "
                        "database")


def test_settings_from_the_environment_are_named_as_such(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = cli("status", env={"TUNER_STORAGE_PASSWORD_FILE": str(missing)})
    assert_one_line(result, 2, f"$TUNER_STORAGE_PASSWORD_FILE: cannot read {missing}")
    result = cli("status", env={"TUNER_STORAGE": "not a url"})
    assert_one_line(result, 2, "$TUNER_STORAGE: malformed storage URL")


def test_an_sqlite_url_with_two_slashes_says_how_many(tmp_path: Path) -> None:
    result = cli("status", "--storage", "sqlite://tuner.db", cwd=tmp_path)
    assert_one_line(result, 2, "an SQLite URL has three slashes before a relative path "
                    "(sqlite:///tuner.db)")
    assert not list(tmp_path.iterdir())  # nothing created anywhere
    for memory in ("sqlite://", "sqlite:///:memory:"):  # workers could never see it
        result = cli("run", str(write_study(tmp_path)), "--storage", memory, cwd=tmp_path)
        assert_one_line(result, 2, "an in-memory SQLite database lives and dies with one "
                        "process", "sqlite:///tuner.db")


def test_a_port_that_is_not_a_number(tmp_path: Path) -> None:
    result = cli("status", "--storage", "postgresql+psycopg2://u@h:abc/db")
    assert_one_line(result, 2, "the port must be a number")


@pytest.mark.parametrize("verb", [["status"], ["best", "--study", "x"], ["trials", "--study", "x"],
                                  ["importance", "--study", "x"], ["worker", "--study", "x"],
                                  ["dashboard"]])
def test_a_password_with_an_unescaped_at_sign_is_never_printed(verb: list[str]) -> None:
    url = "postgresql+psycopg2://postgres:p@S3cretPW@127.0.0.1:1/db"
    result = cli(*verb, "--storage", url)
    assert_one_line(result, 2, "the password contains '@'", "%40")
    assert "S3cretPW" not in result.stdout + result.stderr


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_dashboard_port_out_of_range(port: str) -> None:
    assert_one_line(cli("dashboard", "--port", port), 2, "--port")


def test_dashboard_on_a_host_that_is_not_here(tmp_path: Path) -> None:
    assert cli("create", str(write_study(tmp_path)), cwd=tmp_path).returncode == 0
    result = cli("dashboard", "--host", "999.1.1.1", cwd=tmp_path)
    assert_one_line(result, 1, "cannot listen on 999.1.1.1", "(check --host)")


def test_sigterm_stops_the_dashboard_as_ctrl_c_does(tmp_path: Path) -> None:
    import signal
    import subprocess

    from conftest import TUNER

    assert cli("create", str(write_study(tmp_path)), cwd=tmp_path).returncode == 0
    proc = subprocess.Popen([*TUNER, "dashboard", "--port", "0"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and "optuna-dashboard for" in proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)  # as systemd, Docker or Kubernetes stop it
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Dashboard stopped." in out and err == "", err


def test_an_npz_of_python_objects(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, x=np.array([object()] * 4, dtype=object), y=np.zeros(4, dtype=int))
    path = write_study(tmp_path, source=f"npz:{data}")
    result = cli("create", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert_one_line(result, 2, "array x holds Python objects")
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("content", [b"PK\x03\x04" + b"not a zip archive" * 20,
                                     b"x,y\n1,2\n"], ids=["broken zip", "text"])
def test_a_corrupt_npz(tmp_path: Path, content: bytes) -> None:
    """Not numpy's advice to unpickle it: the file is no npz at all."""
    data = tmp_path / "data.npz"
    data.write_bytes(content)
    path = write_study(tmp_path, source=f"npz:{data}")
    result = cli("create", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert_one_line(result, 2, "not a .npz file (a zip of .npy arrays); write it with "
                    "numpy.savez")
    assert "pickle" not in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_a_relative_data_path_says_where_it_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "my" / "data").mkdir(parents=True)
    np.savez(tmp_path / "my" / "data" / "d.npz", x=np.zeros((4, 8, 8)), y=np.arange(4) % 2)
    path = write_study(tmp_path / "my", source="npz:data/d.npz")
    result = cli("create", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}",
                 cwd=tmp_path)
    assert_one_line(result, 2, f"looked for {tmp_path / 'data' / 'd.npz'}: a relative path is "
                    "read from the directory each command runs in")
    assert cli("create", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}",
               cwd=tmp_path / "my").returncode == 0


def test_a_reader_that_goes_away_is_not_an_error(tmp_path: Path) -> None:
    """`tuner trials | head -1`: the pipe closes before tuner writes; no traceback, exit 0."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    assert run_tuner("create", str(write_study(tmp_path)), "--storage", url).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "tuner", "trials", "--study", "tiny",
                             "--storage", url, "--format", "csv"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""


def test_a_confirm_asking_for_too_many_runs_is_refused_before_queuing(tmp_path: Path) -> None:
    """A typo such as --seeds 100000 would queue runs for hours under the lock every claim
    takes, and a confirm request cannot be taken back."""
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    assert cli("create", str(write_study(tmp_path, "many")), "--storage", url).returncode == 0
    result = cli("confirm", "--study", "many", "--storage", url, "--top", "1000",
                 "--seeds", "100000")
    assert_one_line(result, 2, "confirm: --top 1000 --seeds 100000 asks for too many runs: at "
                    "most --top 50 and --seeds 20")
    study = optuna.load_study(study_name="many", storage=url)
    assert "confirm" not in study.user_attrs and not study.trials


def test_confirm_before_any_trial_completed_exits_1_as_best_does(tmp_path: Path) -> None:
    """No completed trial yet is the study's state, not a mistake in the command: `tuner
    best`, `plot` and `confirm` all exit 1 for it, and nothing is queued."""
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    assert cli("create", str(write_study(tmp_path, "early")), "--storage", url).returncode == 0
    assert_one_line(cli("confirm", "--study", "early", "--storage", url), 1,
                    "study 'early' has no completed trial to confirm yet")
    assert_one_line(cli("best", "--study", "early", "--storage", url), 1,
                    "no completed trial yet")
    study = optuna.load_study(study_name="early", storage=url)
    assert "confirm" not in study.user_attrs and not study.trials
