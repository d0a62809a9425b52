"""`tuner dashboard` serves the real optuna-dashboard on a study that has run: its JSON API
holds the study, every trial's per-epoch val_loss and saved model (downloadable), and the
study page renders in headless Chromium. On SQLite and the real PostgreSQL.

Chromium comes from Debian (``apt-get install chromium chromium-driver``; ``.ci/run``
installs it): without it this test fails rather than skips, so CI cannot pass unseen.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import TUNER, run_tuner, write_study

from tuner import study as studies
from tuner.budget import Claimer
from tuner.retention import Retention
from tuner.storage import open_storage

pytestmark = pytest.mark.slow
STUDY = "dash-view"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200, url
        return response.read()


@pytest.fixture
def dashboard(tmp_path: Path, any_url: str) -> Iterator[tuple[str, str, Path]]:
    """(base URL, storage URL, run directory) of a dashboard on a freshly run study."""
    path = write_study(tmp_path, STUDY, n_trials=3, epochs=2)
    proc = run_tuner("run", str(path), "--storage", any_url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Retention deletes all but the best model, as keep_models = 1 would have: the study
    # page must still load (a deleted model's record once broke it) and list what is left.
    storage = open_storage(any_url, heartbeat=False)
    study, _ = studies.load(STUDY, storage)
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path / "tuner-artifacts"))
    assert Retention(Claimer(study, storage), store, keep=1).prune() == 2
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("TUNER_ARTIFACTS", "TUNER_STORAGE")}
    server = subprocess.Popen([*TUNER, "dashboard", "--storage", any_url, "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"tuner dashboard exited {server.returncode}: "
                            f"{server.stderr.read()}")
            try:
                _get(f"{base}/api/meta", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail("tuner dashboard did not answer within 90 s")
                time.sleep(0.3)
        yield base, any_url, tmp_path
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out, err = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            out, err = server.communicate()
    assert server.returncode == 0, err
    assert f"{base}/dashboard" in out and "Traceback" not in err


def test_dashboard_api_curves_artifacts_and_page(dashboard: tuple[str, str, Path],
                                                 tmp_path: Path) -> None:
    base, url, run_dir = dashboard
    summaries = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
    (summary,) = [s for s in summaries if s["study_name"] == STUDY]
    study_id = summary["study_id"]
    detail = json.loads(_get(f"{base}/api/studies/{study_id}"))
    assert detail["name"] == STUDY and detail["has_intermediate_values"] is True
    study, _ = studies.load(STUDY, open_storage(url, heartbeat=False))
    trials = {t.number: t for t in study.trials}
    assert len(detail["trials"]) == 3
    for shown in detail["trials"]:
        trial = trials[shown["number"]]
        assert shown["state"] == "Complete"
        # the per-epoch val_loss curve, exactly as the worker reported it
        curve = {p["step"]: p["value"] for p in shown["intermediate_values"]}
        assert curve == pytest.approx(trial.intermediate_values) and set(curve) == {1, 2}
        attrs = {a["key"]: a["value"] for a in shown["user_attrs"]}
        assert {"val_accuracy", "gap", "epochs_run", "host", "model_artifact"} <= set(attrs)
        if trial.number != study.best_trial.number:
            assert shown["artifacts"] == [] and trial.user_attrs["model_artifact"] is None
            continue
        (artifact,) = shown["artifacts"]
        assert artifact["artifact_id"] == trial.user_attrs["model_artifact"]
        # the saved model downloads through the dashboard, byte for byte
        body = _get(f"{base}/artifacts/{study_id}/{shown['trial_id']}/"
                    f"{artifact['artifact_id']}")
        stored = (run_dir / "tuner-artifacts" / artifact["artifact_id"]).read_bytes()
        assert body == stored and body[:2] == b"PK"  # a .keras file is a zip
    importances = json.loads(_get(f"{base}/api/studies/{study_id}/param_importances"))
    names = {i["name"] for i in importances["param_importances"][0]}
    assert names == {"dropout", "l2", "augment"}

    page = f"{base}/dashboard/studies/{study_id}"
    png = tmp_path / "study.png"
    _chromium(tmp_path / "profile-1", f"--screenshot={png}", page)
    assert png.is_file(), "Chromium wrote no screenshot"
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (1400, 1000)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "the screenshot is (nearly) blank"
    dom = _chromium(tmp_path / "profile-2", "--dump-dom", page)
    assert STUDY in dom, dom[-2000:]
    shot_dir = os.environ.get("TUNER_TEST_SCREENSHOTS")
    if shot_dir:  # keep the picture for a human to look at
        shutil.copy(png, Path(shot_dir) / f"dashboard-study-{url.split(':')[0]}.png")


def _chromium(profile: Path, mode: str, page: str, size: str = "1400,1000") -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed: `apt-get install -y --no-install-recommends "
                    "chromium chromium-driver` (.ci/run does this)")
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", f"--window-size={size}",
         "--virtual-time-budget=10000", mode, page],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
