"""See the overfitting: the learning curves and knob figures of a real short study.

One real study (tiny MLP, digits, 3 epochs) runs once per module through ``tuner run``; each
test copies it into its own storage (SQLite file or a fresh PostgreSQL database) with Optuna's
``copy_study``. ``tuner plot`` writes offline HTML and PNG from it; ``tuner best`` draws the
winner's curves; the dashboard's study page (real optuna-dashboard, headless Chromium) shows
the figures the workers saved; two processes updating the figures at once lose nothing.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import cli, write_study
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial
from test_dashboard import STUDY as DASH_STUDY
from test_dashboard import _chromium, _get, dashboard  # noqa: F401 - the fixture

from tuner import attrs, render
from tuner import study as studies
from tuner.dashboard import CURVES_ID, KNOBS_ID, FigurePublisher
from tuner.spec import load_spec
from tuner.storage import open_storage

STUDY = "see-overfit"
TRIALS = 4


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite URL holding a real study of 4 completed trials (3 epochs each)."""
    directory = tmp_path_factory.mktemp("ran")
    path = write_study(directory, STUDY, n_trials=TRIALS, epochs=3)
    url = f"sqlite:///{directory / 'ran.db'}"
    result = cli("run", str(path), "--storage", url, cwd=directory)
    assert result.returncode == 0, result.stderr
    return url


def saved_figures(url: str, name: str) -> dict[str, str]:
    """The figures optuna-dashboard would serve for study ``name``, as JSON text by id."""
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    storage = optuna.storages.RDBStorage(url)
    return get_plotly_graph_objects(storage.get_study_system_attrs(
        storage.get_study_id_from_name(name)))


def copy_to(ran: str, url: str) -> None:
    optuna.copy_study(from_study_name=STUDY, from_storage=ran, to_storage=url)


def test_curves_are_stored_for_every_trial(ran: str) -> None:
    study = optuna.load_study(study_name=STUDY, storage=ran)
    for t in study.trials:
        curve = t.user_attrs["curve"]
        assert len(curve["val_loss"]) == len(curve["train_loss"]) == len(curve["t"]) == 3
        assert curve["val_loss"][t.user_attrs["best_epoch"] - 1] == pytest.approx(t.value,
                                                                                 abs=1e-4)


def test_plot_html_and_png(ran: str, any_url: str, tmp_path: Path) -> None:
    copy_to(ran, any_url)
    page = tmp_path / "overfit.html"
    result = cli("plot", "--study", STUDY, "--storage", any_url, "-o", str(page))
    assert result.returncode == 0, result.stderr
    assert f"Wrote {page}" in result.stdout
    text = page.read_text()
    assert "plotly.js v" in text  # inline, not from a CDN
    assert not re.search(r"<(script|link)[^>]+(src|href)=[\"']?https?:", text)
    scripts = re.findall(r"<script[^>]*>.*?</script>", text, flags=re.S)
    library = [s for s in scripts if "plotly.js v" in s]
    assert len(library) == 1
    rest = text.replace(library[0], "")
    # plotly.js's own source names map-tile servers (used only by map traces); nothing else
    assert not re.search(r"https?://", rest), re.findall(r"https?://\S{0,60}", rest)
    study = optuna.load_study(study_name=STUDY, storage=any_url)
    for t in study.trials:
        assert f"#{t.number} validation" in rest and f"#{t.number} training" in rest
    assert json.dumps(render.curves_title(4))[1:-1] in rest  # as plotly's JSON escapes it
    assert '"type":"log"' in rest

    png = tmp_path / "overfit.png"
    result = cli("plot", "--study", STUDY, "--storage", any_url, "--top", "2", "-o", str(png))
    assert result.returncode == 0, result.stderr
    from PIL import Image, ImageStat

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1400, 1400)
        stat = ImageStat.Stat(image.convert("L"))
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert stat.stddev[0] > 10, f"the PNG is (nearly) blank: stddev {stat.stddev[0]:.1f}"
    assert colors is not None and len(colors) > 100
    print(f"PNG written to {png}")


def test_best_draws_the_winners_curves(ran: str) -> None:
    result = cli("best", "--study", STUDY, "--storage", ran)
    assert result.returncode == 0, result.stderr
    val = next(ln for ln in result.stdout.splitlines() if ln.startswith("  val_loss   ")
               and "→" in ln)
    spark = val.split()[1]
    assert len(spark) == 3 and set(spark) <= set("▁▂▃▄▅▆▇█"), val
    assert any(ln.startswith("  train_loss") and "→" in ln for ln in result.stdout.splitlines())
    assert "turned up" in result.stdout
    summary = json.loads(cli("best", "--study", STUDY, "--storage", ran, "--json").stdout)
    assert {"trial", "val_loss", "gap", "train_loss", "best_epoch", "epochs_run", "params",
            "curve", "val_loss_turned_up_at"} <= set(summary)
    curve = summary["curve"]["val_loss"]
    lowest = max(i for i, v in enumerate(curve) if v == min(curve)) + 1
    assert summary["val_loss_turned_up_at"] == (None if lowest == len(curve) else lowest + 1)


def test_worker_saved_the_dashboard_figures_and_note(ran: str) -> None:
    study = optuna.load_study(study_name=STUDY, storage=ran)
    assert study.metric_names == [render.OBJECTIVE_NAME]
    from optuna_dashboard import get_note

    saved = saved_figures(ran, STUDY)
    assert set(saved) == {CURVES_ID, KNOBS_ID}
    curves, knobs = json.loads(saved[CURVES_ID]), json.loads(saved[KNOBS_ID])
    names = {tr["name"] for tr in curves["data"]}
    for t in study.trials:  # the final update, when the worker stopped, saw every trial
        assert {f"#{t.number} validation", f"#{t.number} training"} <= names
    assert all(tr["line"]["dash"] == "dash" for tr in curves["data"]
               if tr["name"].endswith("training"))
    assert [a["type"] for k, a in knobs["layout"].items()
            if k.startswith("xaxis") and a.get("title", {}).get("text") == "l2"] == ["log"]
    note = get_note(study)
    assert f"**Best trial #{study.best_trial.number}**" in note and render.NOTE_END in note


def test_plot_bad_input(ran: str, tmp_path: Path) -> None:
    from test_cli_errors import assert_one_line

    base = ("plot", "--study", STUDY, "--storage", ran)
    assert_one_line(cli(*base, "-o", str(tmp_path / "x.pdf")), 2, "unknown file type",
                    ".html or .png")
    assert_one_line(cli(*base, "-o", str(tmp_path / "no" / "x.png")), 2, "there is no folder")
    (tmp_path / "folder.png").mkdir()
    assert_one_line(cli(*base, "-o", str(tmp_path / "folder.png")), 2, "is a folder")
    assert_one_line(cli(*base, "-o", "/proc/tuner-plot.png"), 1, "cannot write")
    assert_one_line(cli("plot", "--study", "see-overfitt", "--storage", ran, "-o",
                        str(tmp_path / "x.png")), 2, "did you mean 'see-overfit'")
    assert_one_line(cli("plot", "--study", STUDY, "--storage", ran), 2, "-o")
    empty = write_study(tmp_path, "nothing-yet")
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert cli("create", str(empty), "--storage", url).returncode == 0
    # like `tuner best` on such a study: not the user's mistake, nothing to show yet (exit 1)
    assert_one_line(cli("plot", "--study", "nothing-yet", "--storage", url, "-o",
                        str(tmp_path / "x.png")), 1, "no completed trial yet")
    assert not list(tmp_path.glob("x.*"))


def test_plot_imports_no_tensorflow(ran: str, tmp_path: Path) -> None:
    for out in ("f.html", "f.png"):
        code = ("import sys; from tuner.cli import main; rc = main(['plot', '--study', "
                f"{STUDY!r}, '--storage', {ran!r}, '-o', {str(tmp_path / out)!r}]); "
                "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', "
                "'keras')); print('LOADED', bad); sys.exit(rc)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "LOADED []" in proc.stdout, proc.stdout[-500:]


# --- two workers at once -------------------------------------------------------------------------

DISTS = {"dropout": FloatDistribution(0.0, 0.5), "l2": FloatDistribution(1e-6, 1e-2, log=True),
         "augment": FloatDistribution(0.0, 0.5)}


def _finish_trials(url: str, name: str, worker: int, n: int) -> None:
    """What a worker does around its figures: finish a trial (real curves, no training),
    then ask for an update; at the end the final one. Runs in its own process."""
    storage = open_storage(url, heartbeat=False)
    study, _ = studies.load(name, storage)
    publisher = FigurePublisher(study, storage, interval=0)
    rng = random.Random(worker)
    for _ in range(n):
        _finish_one(study, rng, worker)
        assert publisher.update(), "an update with interval 0 was skipped"
    publisher.final()


def _finish_one(study: optuna.Study, rng: random.Random, worker: int = 0) -> None:
    """A completed trial with a real-looking 6-epoch curve, no training."""
    val = [2.0 - 0.3 * e + 0.05 * e * e + rng.uniform(0, 0.1) for e in range(6)]
    train = [v - 0.05 * e for e, v in enumerate(val)]
    best = val.index(min(val)) + 1
    study.add_trial(create_trial(
        params={"dropout": rng.uniform(0, 0.5), "l2": 10 ** rng.uniform(-6, -2),
                "augment": rng.uniform(0, 0.5)}, distributions=DISTS, value=min(val),
        user_attrs={"curve": {"t": list(range(6)), "val_loss": val, "train_loss": train},
                    "best_epoch": best, "gap": val[best - 1] - train[best - 1],
                    "worker": worker}))


def test_figures_wait_the_interval_or_fifty_times_their_cost(any_url: str,
                                                            tmp_path: Path) -> None:
    """Across workers (the times live in the study), and longer when an update is slow: at
    10,000 trials one takes seconds, and a worker must not spend more than 2 % drawing."""
    spec = load_spec(write_study(tmp_path, "throttle", n_trials=40))
    storage = open_storage(any_url, heartbeat=False)
    study, _ = studies.create_or_resume(spec, storage)
    rng = random.Random(0)
    for _ in range(3):
        _finish_one(study, rng)
    first, other = (FigurePublisher(study, storage, interval=30) for _ in range(2))
    assert first.update() and first.updates == 1
    assert attrs.FIGURES_SECONDS not in study.user_attrs, "a cold update's imports counted"
    assert not other.update() and not other.after_trial(), "another worker's update ignored"
    assert first.update(force=True)  # a warm update records what it took
    took = study.user_attrs[attrs.FIGURES_SECONDS]
    assert 0 < took < 30

    def last_update_ago(seconds: float, cost: float) -> None:
        study.set_user_attr(attrs.FIGURES_UPDATED, time.time() - seconds)
        study.set_user_attr(attrs.FIGURES_SECONDS, cost)

    last_update_ago(31, 0.2)  # cheap: the interval rules
    assert other.update()
    last_update_ago(31, 2.0)  # 2 s a draw (a very large study): 100 s between two
    assert not other.update()
    last_update_ago(99, 2.0)
    assert not other.update()
    last_update_ago(101, 2.0)
    assert other.update()
    assert FigurePublisher(study, storage, interval=0).update(), "interval 0 throttled"


@pytest.mark.slow
def test_two_workers_updating_at_once_lose_nothing(any_url: str, tmp_path: Path) -> None:
    spec = load_spec(write_study(tmp_path, "race", n_trials=40))
    studies.create_or_resume(spec, open_storage(any_url, heartbeat=False))
    per_worker = 6
    code = ("import sys; sys.path.insert(0, {tests!r}); from test_plots import _finish_trials; "
            "_finish_trials({url!r}, 'race', int(sys.argv[1]), {n})")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(
        tests=str(Path(__file__).parent), url=any_url, n=per_worker), str(w)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in (1, 2)]
    # meanwhile a reader polls, as the dashboard does
    polls = torn = 0
    while any(p.poll() is None for p in procs):
        for blob in saved_figures(any_url, "race").values():
            polls += 1
            try:
                json.loads(blob)
            except ValueError:
                torn += 1  # read mid-write: the dashboard keeps the figure it has
        time.sleep(0.05)
    print(f"reader: {torn} of {polls} figure reads caught a write half done")
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="race", storage=any_url)
    saved = saved_figures(any_url, "race")
    knobs, curves = json.loads(saved[KNOBS_ID]), json.loads(saved[CURVES_ID])
    shown = set()
    for trace in knobs["data"]:
        shown |= {int(t.lstrip("#")) for t in trace.get("text", [])}
    assert shown == {t.number for t in study.trials} and len(shown) == 2 * per_worker
    best = sorted(study.trials, key=lambda t: t.value)[:5]
    assert {tr["name"] for tr in curves["data"] if tr["name"].endswith("validation")} == \
        {f"#{t.number} validation" for t in best}
    assert f"out of {2 * per_worker} completed trials" in \
        __import__("optuna_dashboard").get_note(study)


# --- the dashboard's study page ------------------------------------------------------------------


@pytest.mark.slow
def test_dashboard_page_shows_the_figures(dashboard: tuple[str, str, Path],  # noqa: F811
                                          tmp_path: Path) -> None:
    base, _, _ = dashboard  # test_dashboard's fixture: a study that ran, and its dashboard
    summaries = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
    (summary,) = [s for s in summaries if s["study_name"] == DASH_STUDY]
    study_id = summary["study_id"]
    detail = json.loads(_get(f"{base}/api/studies/{study_id}"))
    assert detail["objective_names"] == [render.OBJECTIVE_NAME]
    saved = {g["id"]: json.loads(g["graph_object"]) for g in detail["plotly_graph_objects"]}
    assert set(saved) == {CURVES_ID, KNOBS_ID}
    names = {tr["name"] for tr in saved[CURVES_ID]["data"]}
    assert {f"#{t['number']} validation" for t in detail["trials"]} <= names
    assert "**Best trial #" in detail["note"]["body"]

    page = f"{base}/dashboard/studies/{study_id}"
    png = tmp_path / "study-page.png"
    _chromium(tmp_path / "profile-1", f"--screenshot={png}", page, size="1400,2200")
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (1400, 2200)
    dom = _chromium(tmp_path / "profile-2", "--dump-dom", page, size="1400,2200")
    # plotly draws titles and legend entries as SVG text in the page
    assert render.curves_title(3) in dom, dom[-3000:]
    assert render.knobs_title(3) in dom
    assert all(f"#{t['number']} validation" in dom for t in detail["trials"])
    print(f"dashboard screenshot: {png}")


def test_the_curves_are_of_the_best_configurations_not_of_one_retrained() -> None:
    """After a confirm step the best trials are often one configuration and its reruns:
    the curves show the best few configurations, each by its best run."""
    from tuner.figures import gather

    study = optuna.create_study()
    rng = random.Random(0)
    for _ in range(5):
        _finish_one(study, rng)
    best = min(study.trials, key=lambda t: t.value)
    for shift in (0.001, 0.002, 0.003):  # reruns, each nearly as good as the best
        study.add_trial(create_trial(params=best.params, distributions=DISTS,
                                     value=best.value + shift, user_attrs=best.user_attrs))
    facts = gather(study, top=3)
    assert facts is not None and facts.best_trial == best.number
    shown = [study.trials[c.trial] for c in facts.curves]
    assert shown[0].number == best.number
    assert len({tuple(sorted(t.params.items())) for t in shown}) == 3
    ranked = sorted((t for t in study.trials[:5]), key=lambda t: t.value)
    assert [t.number for t in shown] == [t.number for t in ranked[:3]]
