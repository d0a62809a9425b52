"""`tuner best --export-model`: the best trial's saved model, loaded and evaluated on the
study's own validation split, gives the recorded val_loss. Bad input through the real CLI:
one line, exit 1 or 2, no traceback. On SQLite and the real PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy
from conftest import SERVER_URL, run_tuner, write_study

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Ran:
    url: str
    directory: Path
    artifacts: Path


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ran(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Ran]:
    """A tiny study run to the end by the real CLI (3 trials, 2 epochs), once per storage."""
    directory = tmp_path_factory.mktemp(f"export-{request.param}")
    engine = None
    if request.param == "sqlite":
        url = f"sqlite:///{directory / 'tuner.db'}"
    else:
        name = f"tuner_test_{uuid.uuid4().hex[:12]}"
        engine = sqlalchemy.create_engine(SERVER_URL, isolation_level="AUTOCOMMIT",
                                          poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        url = sqlalchemy.engine.make_url(SERVER_URL).set(database=name).render_as_string(
            hide_password=False)
    try:
        path = write_study(directory, "export", n_trials=3, epochs=2)
        proc = run_tuner("run", str(path), "--storage", url, cwd=directory)
        assert proc.returncode == 0, proc.stderr
        artifacts = (directory / "tuner-artifacts").resolve()
        assert len(list(artifacts.iterdir())) == 3
        yield Ran(url, directory, artifacts)
    finally:
        if engine is not None:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            engine.dispose()


def test_exported_model_reproduces_the_recorded_val_loss(ran: Ran, tmp_path: Path) -> None:
    target = tmp_path / "models" / "best.keras"
    target.parent.mkdir()
    proc = run_tuner("best", "--study", "export", "--storage", ran.url, "--json",
                     "--export-model", str(target))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["exported_model"] == str(target.resolve())
    assert target.is_file() and not list(target.parent.glob(".*part"))

    import keras
    import numpy as np

    from tuner import study as studies
    from tuner.data import load_arrays, make_datasets
    from tuner.storage import open_storage

    study, spec = studies.load("export", open_storage(ran.url, heartbeat=False))
    assert summary["trial"] == study.best_trial.number
    arrays = load_arrays(spec.data, seed=spec.seed or 0)
    val = make_datasets(arrays, spec.model.batch_size, seed=spec.seed or 0).val
    model = keras.saving.load_model(target)
    scores = model.evaluate(val, return_dict=True, verbose=0)
    assert scores["xent"] == pytest.approx(study.best_value, rel=1e-5)
    assert scores["accuracy"] == pytest.approx(summary["val_accuracy"], abs=1e-6)
    # and by hand, in case a compiled metric ever changes meaning
    probs = model.predict(arrays.x_val, verbose=0)
    xent = float(-np.mean(np.log(probs[np.arange(len(probs)), arrays.y_val])))
    assert xent == pytest.approx(study.best_value, rel=1e-4)
    # a worse trial's model would not match: the export really is the best one
    others = [t.value for t in study.trials if t.number != study.best_trial.number]
    assert all(abs(v - xent) > 1e-4 for v in others)


_PREDICT = """
import json, sys
import numpy as np, keras
model = keras.saving.load_model(sys.argv[1])
data = np.load(sys.argv[2])
probs = model.predict(data["x"], verbose=0)
picked = np.clip(probs[np.arange(len(probs)), data["y"]], 1e-7, 1 - 1e-7)
print(json.dumps({"xent": float(-np.mean(np.log(picked))), "dtype": str(data["x"].dtype)}))
"""


def _raw_digits() -> tuple:  # noqa: ANN202
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * 255 / 16).round().astype(np.uint8), digits.target


def _export_and_predict_raw(tmp_path: Path, study_file: Path, x_raw, y) -> None:  # noqa: ANN001
    """Run the study, export the winner, predict in a fresh process on the raw arrays."""
    import numpy as np

    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    run = run_tuner("run", str(study_file), "--storage", url, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    target = tmp_path / "best.keras"
    best = run_tuner("best", "--study", "raw", "--storage", url, "--json", "--export-model",
                     str(target))
    assert best.returncode == 0, best.stderr
    raw = tmp_path / "raw-val.npz"
    np.savez(raw, x=x_raw, y=y)
    fresh = subprocess.run([sys.executable, "-c", _PREDICT, str(target), str(raw)],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert fresh.returncode == 0, fresh.stderr
    measured = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert measured["dtype"] == "uint8"  # fed exactly as the source holds them
    assert measured["xent"] == pytest.approx(json.loads(best.stdout)["val_loss"], rel=1e-4)


def test_exported_model_takes_an_npz_sources_raw_pixels(tmp_path: Path) -> None:
    """uint8 pixels in the npz: the exported model rescales them itself."""
    import numpy as np

    x, y = _raw_digits()
    source = tmp_path / "digits.npz"
    np.savez(source, x_train=x[:300], y_train=y[:300], x_val=x[300:420], y_val=y[300:420])
    study = write_study(tmp_path, "raw", n_trials=2, epochs=2, source=f"npz:{source}",
                        limit=None)
    _export_and_predict_raw(tmp_path, study, x[300:420], y[300:420])


def test_exported_model_takes_an_image_folders_pixels(tmp_path: Path) -> None:
    """Images as read from the folder (RGB, 0-255, at image_size): no hidden scaling."""
    from PIL import Image

    from tuner.data import load_arrays
    from tuner.spec import load_spec

    x, y = _raw_digits()
    folder = tmp_path / "images"
    for i in range(200):
        (folder / f"digit{y[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).convert("RGB").save(folder / f"digit{y[i]}" / f"{i}.png")
    study = write_study(tmp_path, "raw", n_trials=2, epochs=2, source=f"images:{folder}",
                        limit=None, extra_study="")
    text = study.read_text().replace("[data]", "[data]\nimage_size = [8, 8]")
    study.write_text(text)
    spec = load_spec(study)
    arrays = load_arrays(spec.data, seed=spec.seed or 0)
    assert arrays.x_val.max() > 1  # the folder's own pixel values
    _export_and_predict_raw(tmp_path, study, arrays.x_val.astype("uint8"), arrays.y_val)


def test_export_into_a_directory_and_over_an_old_file(ran: Ran, tmp_path: Path) -> None:
    proc = run_tuner("best", "--study", "export", "--storage", ran.url,
                     "--export-model", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (written,) = tmp_path.glob("*.keras")
    assert written.name.startswith("export-trial") and written.stat().st_size > 1000
    number = int(written.name.removeprefix("export-trial").removesuffix(".keras"))
    assert f"Exported the best-epoch model of trial #{number} to {written}" in proc.stdout
    exported = written.read_bytes()
    written.write_bytes(b"stale")
    proc = run_tuner("best", "--study", "export", "--storage", ran.url,
                     "--export-model", str(written))
    assert proc.returncode == 0, proc.stderr
    assert written.read_bytes() == exported  # the best trial's model again, whole
    nested = tmp_path / "models" / "v1" / "best.keras"  # missing folders are created
    proc = run_tuner("best", "--study", "export", "--storage", ran.url,
                     "--export-model", str(nested))
    assert proc.returncode == 0, proc.stderr
    assert nested.stat().st_size > 1000


def _one_line_error(proc, code: int) -> str:  # noqa: ANN001
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_export_path_not_writable(ran: Ran, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: a file where a folder goes
            (tmp_path / "a-file").write_text("")
            target = tmp_path / "a-file" / "best.keras"
        else:
            target = locked / "best.keras"
        proc = run_tuner("best", "--study", "export", "--storage", ran.url,
                         "--export-model", str(target))
        line = _one_line_error(proc, 1)
        assert line.startswith(f"tuner: error: cannot write {target}: ")
        assert not target.exists()
    finally:
        locked.chmod(0o700)
    proc = run_tuner("best", "--study", "export", "--storage", ran.url,
                     "--export-model", str(tmp_path / "best.h5"))
    assert "give a file name ending in .keras" in _one_line_error(proc, 2)


def test_missing_artifact_says_where_it_looked(ran: Ran, tmp_path: Path) -> None:
    moved = ran.directory / "moved-away"
    shutil.move(ran.artifacts, moved)
    try:
        proc = run_tuner("best", "--study", "export", "--storage", ran.url,
                         "--export-model", str(tmp_path / "best.keras"))
        line = _one_line_error(proc, 1)
        assert "is missing: looked in " + str(ran.artifacts) in line
        assert not (tmp_path / "best.keras").exists()
        # the directory exists but the file in it was deleted
        ran.artifacts.mkdir()
        proc = run_tuner("best", "--study", "export", "--storage", ran.url,
                         "--export-model", str(tmp_path / "best.keras"))
        line = _one_line_error(proc, 1)
        assert f"is missing: looked in {ran.artifacts}; was it deleted?" in line
        # --artifacts points at where the models went
        proc = run_tuner("best", "--study", "export", "--storage", ran.url,
                         "--artifacts", str(moved), "--export-model",
                         str(tmp_path / "best.keras"))
        assert proc.returncode == 0, proc.stderr
    finally:
        shutil.rmtree(ran.artifacts, ignore_errors=True)
        shutil.move(moved, ran.artifacts)


def test_unknown_study_and_no_completed_trial(ran: Ran, tmp_path: Path) -> None:
    proc = run_tuner("best", "--study", "exprt", "--storage", ran.url,
                     "--export-model", str(tmp_path / "m.keras"))
    assert _one_line_error(proc, 2) == ("tuner: error: unknown study 'exprt': did you mean "
                                        "'export'?")
    path = write_study(tmp_path, "waiting", n_trials=2)
    assert run_tuner("create", str(path), "--storage", ran.url).returncode == 0
    proc = run_tuner("best", "--study", "waiting", "--storage", ran.url,
                     "--export-model", str(tmp_path / "m.keras"))
    assert "has no completed trial yet" in _one_line_error(proc, 1)
    assert not (tmp_path / "m.keras").exists()
