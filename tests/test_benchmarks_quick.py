"""Every benchmark runs at its smallest size (``--quick``) so that none can rot.

These check that each script finishes and writes JSON with the keys the report is built from;
they never assert a timing (benchmarks are not tests, and this machine is shared and noisy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
EXPECTED = {
    "bench_overhead": ("overhead", {"wall_ratio", "fit_ratio", "bare", "tuner", "probes",
                                       "warm_ratio_interval"}),
    "bench_train_sample": ("train_sample", {"families", "n_train", "n_val"}),
    "bench_epochs": ("epochs", {"trials", "goal_met"}),
    "bench_storage": ("storage", {"cells", "history_reads", "goal", "add_trials_per_s",
                                  "peak_connections_at_max_workers"}),
    "bench_pruning": ("pruning", {"runs", "per_setting", "default"}),
    # after bench_pruning: it replays the curves of that quick run
    "replay_pruning": ("replay_pruning", {"results", "rules", "sizes"}),
    "bench_quality": ("quality", {"runs", "summary", "goal", "paired", "noise"}),
    "bench_scaling": ("scaling", {"runs", "projection"}),
    "bench_status": ("bench_status", {"results", "goal", "n_trials"}),
    "bench_chaos": ("chaos", {"summary", "rounds"}),
    "bench_disk": ("disk", {"default", "keep_all", "projection"}),
    "bench_figures": ("figures", {"curve", "updates"}),
    # on this machine's CPU and TensorFlow: the checks that need a GPU report None
    "bench_gpu": ("gpu", {"backend", "devices", "runs", "augmentation", "checks"}),
}
COMMON = {"benchmark", "quick", "command", "machine", "tables"}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-out")


@pytest.mark.slow
@pytest.mark.parametrize("script", list(EXPECTED))
def test_benchmark_runs_quick(script: str, out_dir: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--out",
                           str(out_dir)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name, keys = EXPECTED[script]
    result = json.loads((out_dir / f"{name}.json").read_text())
    assert result["quick"] is True
    assert COMMON | keys <= set(result), sorted(COMMON | keys - set(result))
    assert result["tables"] and all(t.startswith("| ") for t in result["tables"])
    assert "|" in proc.stdout  # the tables were printed too


@pytest.mark.slow
def test_report_renders_every_section_and_goal(out_dir: Path, tmp_path: Path) -> None:
    """run_all.py turns the JSON of the runs above into RESULTS.md: a section per result and a
    goals table naming every goal."""
    sys.path.insert(0, str(BENCH))
    try:
        from run_all import TITLES
    finally:
        sys.path.remove(str(BENCH))
    present = [p.stem for p in out_dir.glob("*.json") if p.stem in TITLES]
    if not present:
        pytest.skip("no benchmark results in this test run (run with the tests above)")
    report = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--report-only", "--quick",
                           "--out", str(out_dir), "--results", str(report)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = report.read_text()
    assert "## Goals" in text and "## Machine" in text
    for name in present:
        assert f"## {TITLES[name]}" in text
    rows = {"overhead": "| trial overhead |", "epochs": "| epoch stalls |",
            "storage": "| storage latency |", "pruning": "| pruning, ",
            "quality": "| quality, ", "replay_pruning": "| pruning replayed |",
            "bench_status": "| tuner status at 10k trials |",
            "chaos": "| chaos |", "disk": "| disk at 10,000 trials |", "figures": "| figures |",
            "scaling": "| scaling 1 → 2 workers |", "train_sample": "| training sample |"}
    assert set(rows) == set(TITLES), "every result has a goal row"
    for name in present:
        assert rows[name] in text, rows[name]
