"""Disk: how much do saved models take, with the default ``keep_models`` against keeping all?

Two real ``tuner worker`` processes on one PostgreSQL study of fast trials (a tiny network,
one epoch on 100 digits, so that trials finish as fast as they can and models pile up as fast
as they can). The artifact directory is sampled every 0.2 s: its size and file count at the
peak and at the end. Then the same with ``keep_models = "all"``, on fewer trials (its size
grows by exactly one model per completed trial, which the run measures). Projection: 10,000
trials of a 5 MB model (a CIFAR-sized CNN).

    .venv/bin/python benchmarks/bench_disk.py                 # 2,000 trials (~25 min)
    .venv/bin/python benchmarks/bench_disk.py --quick         # 20 trials
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from _common import PY, REPO, parse_args, table, throwaway_database, tuner_cli, write_result

WORKERS = 2
MODEL_MB = 5.0
PROJECTED_TRIALS = 10_000


def _study(directory: Path, name: str, n_trials: int, keep: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""\
        [study]
        name = "{name}"
        n_trials = {n_trials}
        sampler = "random"
        pruner = "none"
        keep_models = {keep}
        seed = 0

        [data]
        source = "digits"
        limit = 100

        [model]
        family = "user_models:tiny"
        epochs = 1
        batch_size = 64

        [search]
        dropout = [0.0, 0.5]
        l2 = [1e-6, 1e-2]
        augment = 0
        """))
    return path


def _size(directory: Path) -> tuple[int, int]:
    files = [p for p in directory.glob("*") if p.is_file()] if directory.is_dir() else []
    total = 0
    for p in files:
        try:
            total += p.stat().st_size
        except OSError:  # deleted between listing and stat
            pass
    return total, len(files)


def _run(url: str, tmp: Path, name: str, n_trials: int, keep: str) -> dict[str, Any]:
    artifacts = tmp / f"{name}-models"
    tuner_cli("create", str(_study(tmp, name, n_trials, keep)), "--storage", url,
              "--artifacts", str(artifacts))
    env = {**os.environ, "TUNER_STORAGE": url, "PYTHONPATH": str(REPO / "tests"),
           "PYTHONUNBUFFERED": "1"}
    peak = {"bytes": 0, "files": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            size, files = _size(artifacts)
            peak["bytes"], peak["files"] = max(peak["bytes"], size), max(peak["files"], files)
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    procs = [subprocess.Popen([PY, "-m", "tuner", "worker", "--study", name, "--gpus", "none"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(WORKERS)]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed: {errors}")
    size, files = _size(artifacts)
    import optuna

    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    complete = sum(t.state.name == "COMPLETE" for t in trials)
    return {"keep_models": keep, "trials": complete, "wall_s": wall,
            "trials_per_s": complete / wall, "end_bytes": size, "end_files": files,
            "peak_bytes": peak["bytes"], "peak_files": peak["files"]}


def main() -> int:
    args = parse_args(__doc__, lambda p: (
        p.add_argument("--trials", type=int, default=2000),
        p.add_argument("--all-trials", type=int, default=300,
                       help="trials of the keep-all run (it grows linearly)")))
    n, n_all = (20, 10) if args.quick else (args.trials, args.all_trials)
    with throwaway_database("tuner_bench_disk") as url, \
            tempfile.TemporaryDirectory(prefix="bench-disk-") as tmp_name:
        tmp = Path(tmp_name)
        default = _run(url, tmp, "disk-default", n, "5")
        print(f"keep_models 5: {default}", flush=True)
        keep_all = _run(url, tmp, "disk-all", n_all, '"all"')
        print(f"keep_models all: {keep_all}", flush=True)
    per_model = keep_all["end_bytes"] / max(1, keep_all["end_files"])
    all_at_n = per_model * default["trials"]
    projection = {
        "trials": PROJECTED_TRIALS, "model_mb": MODEL_MB,
        "keep_all_gb": PROJECTED_TRIALS * MODEL_MB / 1024,
        "default_end_mb": 5 * MODEL_MB,
        "default_peak_mb": (5 + WORKERS) * MODEL_MB,
    }
    mb = 2**20
    t1 = table(["keep_models", "completed trials", "workers", "trials/s", "models at the end",
                "size at the end", "peak models", "peak size"],
               [(r["keep_models"], r["trials"], WORKERS, r["trials_per_s"], r["end_files"],
                 f"{r['end_bytes'] / mb:.2f} MB", r["peak_files"],
                 f"{r['peak_bytes'] / mb:.2f} MB") for r in (default, keep_all)])
    t2 = table(["measure", "value"], [
        ("one saved model (this tiny network)", f"{per_model / 1024:.1f} KB"),
        (f"keep all, {default['trials']} trials (measured per model x trials)",
         f"{all_at_n / mb:.1f} MB"),
        (f"keep 5, {default['trials']} trials: end / peak",
         f"{default['end_bytes'] / mb:.2f} / {default['peak_bytes'] / mb:.2f} MB"),
        (f"projected, {PROJECTED_TRIALS:,} trials of a {MODEL_MB:g} MB model: keep all",
         f"{projection['keep_all_gb']:.1f} GB"),
        (f"projected, same: keep 5 (end / at most, with {WORKERS} workers)",
         f"{projection['default_end_mb']:.0f} / {projection['default_peak_mb']:.0f} MB"),
    ])
    write_result(args, "disk", {"default": default, "keep_all": keep_all,
                                "model_bytes": per_model, "projection": projection},
                 [t1, t2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
