"""Run every benchmark, one after another, and write ``benchmarks/RESULTS.md`` from their JSON.

    .venv/bin/python benchmarks/run_all.py            # the full suite (about 40 min, 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick    # every script at its smallest size
    .venv/bin/python benchmarks/run_all.py --only storage pruning   # rerun some, then report

``--quick`` and ``--out`` pass through to every script. A full run rewrites RESULTS.md (give
``--results PATH`` to write elsewhere, or ``--no-results``); a quick run writes it only when
``--results`` is given, since quick numbers mean little.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, table  # noqa: E402

# bench_status belongs with the inspection verbs; it joins the suite when it exists.
SCRIPTS = ["bench_overhead", "bench_train_sample", "bench_epochs", "bench_storage",
           "bench_pruning", "replay_pruning", "bench_quality",
           "bench_scaling", "bench_status", "bench_chaos", "bench_disk", "bench_figures"]
RESULT_NAMES = {"bench_overhead": "overhead", "bench_train_sample": "train_sample",
                "bench_epochs": "epochs",
                "bench_storage": "storage", "bench_pruning": "pruning",
                "replay_pruning": "replay_pruning",
                "bench_quality": "quality", "bench_scaling": "scaling",
                "bench_status": "bench_status", "bench_chaos": "chaos", "bench_disk": "disk",
                "bench_figures": "figures"}
TITLES = {"overhead": "1. Trial overhead",
          "train_sample": "1b. The training sample in the validation pass",
          "epochs": "2. Epoch-start stalls",
          "storage": "3. Storage at scale", "pruning": "4. Pruning savings",
          "replay_pruning": "4b. Pruning rules replayed on the unpruned searches' curves",
          "quality": "5. Search quality against peers", "scaling": "6. Scaling with workers",
          "bench_status": "7. `tuner status` on a 10,000-trial study",
          "chaos": "8. Chaos: workers killed at random, the study still finishes",
          "disk": "9. Disk: saved models with keep_models",
          "figures": "10. Learning curves and dashboard figures: what they cost"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every script at its smallest size")
    p.add_argument("--out", type=Path, default=HERE / "out", help="JSON output directory")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these (e.g. storage)")
    p.add_argument("--results", type=Path, help="where to write the Markdown report")
    p.add_argument("--no-results", action="store_true", help="write no Markdown report")
    p.add_argument("--note", default="", help="a line to put at the top of the report")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the report from the JSON already in --out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scripts = [s for s in SCRIPTS if (HERE / f"{s}.py").is_file()]
    if args.only:
        scripts = [s for s in scripts if any(o in s for o in args.only)]
    if args.report_only:
        scripts = []
    timings: dict[str, float] = {}
    failed = []
    started = time.time()
    for script in scripts:
        cmd = [sys.executable, str(HERE / f"{script}.py"), "--out", str(args.out)]
        cmd += ["--quick"] if args.quick else []
        print(f"== {script} ==", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        timings[script] = time.time() - t0
        print(f"== {script}: exit {rc}, {timings[script]:.0f}s ==\n", flush=True)
        if rc != 0:
            failed.append(script)
    print(f"benchmarks run: {time.time() - started:.0f}s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    # Seconds per script accumulate across runs into one out dir (e.g. --only reruns).
    record = args.out / "run_all.json"
    earlier = json.loads(record.read_text()) if record.is_file() else {}
    if earlier.get("quick") == args.quick:
        timings = {**earlier.get("seconds", {}), **timings}
    total = sum(timings.values())
    record.write_text(json.dumps({"quick": args.quick, "seconds": timings,
                                  "total_seconds": total, "failed": failed}, indent=2))
    if not args.no_results and (args.results or not args.quick):
        path = args.results or HERE / "RESULTS.md"
        path.write_text(render(args.out, timings, total, args.quick, args.note))
        print(f"wrote {path}")
    return 1 if failed else 0


def _goals(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    rows = []
    if o := results.get("overhead"):
        rows.append(("trial overhead", "warm worker, per trial, b/a <= 1.05",
                     f"warm {o['warm_ratio']:.3f} (median of {len(o['warm']['tuner'])} pairs); "
                     f"whole process {o['wall_ratio']:.3f}",
                     "met" if o["warm_ratio"] <= 1.05 else "missed"))
    if ts := results.get("train_sample"):
        shares = "; ".join(f"{f} {m['share']['uncapped']:.1%} → {m['share']['capped']:.1%}"
                           for f, m in ts["families"].items())
        rows.append(("training sample", "(no goal) its share of a plain epoch, before → now",
                     f"{shares} ({ts['n_train']:,} / {ts['n_val']:,} images)", "-"))
    if e := results.get("epochs"):
        worst = e["worst_over_median"]
        rows.append(("epoch stalls", "worst epoch after the 1st <= 1.5x median",
                     f"worst {worst:.2f}x (plain model.fit, same process: "
                     f"{e['bare_worst_over_median']:.2f}x)",
                     "met" if worst <= 1.5 else "missed"))
    if s := results.get("storage"):
        g = s["goal"]["tuner"]
        key = next(k for k in g if k.startswith("p50_ms_at_"))
        flat = g["growth_smallest_to_largest"] < 0.5 * g["history_growth"]
        rows.append(("storage latency", f"p50 < 50 ms at {key[len('p50_ms_at_'):]} trials, "
                     "flat growth",
                     f"{g[key]:.1f} ms; p50 x{g['growth_smallest_to_largest']:.2f} for "
                     f"x{g['history_growth']:.0f} history; "
                     f"connections at {max(s['worker_counts'])} workers: "
                     f"{s['peak_connections_at_max_workers']}",
                     "met" if g[key] < 50 and flat else "missed"))
    if pr := results.get("pruning"):
        for name, q in pr["default"].items():
            rows.append((f"pruning, {name}", ">= 3x fewer epochs, best val_loss within 2 %",
                         f"{q['epoch_saving_vs_none']:.2f}x fewer epochs, val_loss "
                         f"x{q['best_val_loss_vs_none']:.3f}, test loss of the pick "
                         f"x{q['test_loss_vs_none']:.3f}",
                         "met" if q["goal_met"] else "missed"))
    if rp := results.get("replay_pruning"):
        met = rp["rules_meeting_goal_everywhere"]
        rows.append(("pruning replayed", ">= 3x fewer epochs, best val_loss within 2 %, "
                     f"every dataset and size ({', '.join(map(str, rp['sizes']))} trials)",
                     f"{len(rp['rules'])} rules on {len(rp['runs'])} runs' curves; "
                     f"meeting it: {', '.join(met) or 'none'}", "met" if met else "missed"))
    if q := results.get("quality"):
        for name, g in q["goal"].items():
            p = q["paired"][name]
            rows.append((f"quality, {name}", "mean test loss <= peer's at equal epochs, "
                         "no more wall time",
                         f"test {g['tuner_test_loss']:.4f} vs {g['peer_test_loss']:.4f} "
                         f"(wins/ties/losses {p['wins']}/{p['ties']}/{p['losses']}); "
                         f"{g['tuner_wall_s']:.0f}s vs {g['peer_wall_s']:.0f}s",
                         "met" if g["test_loss_at_least_as_good"] and g["no_more_wall_time"]
                         else "missed"))
    if st := results.get("bench_status"):
        g = st["goal"]
        rows.append(("tuner status at 10k trials", f"< {g['cli_under_s']:g} s",
                     f"{g['worst_cli_median_s']:.2f} s (slower of SQLite, PostgreSQL)",
                     "met" if g["met"] else "missed"))
    if ch := results.get("chaos"):
        c = ch["summary"]
        rows.append(("chaos", "every round ends at its budget, 0 trials lost, workers gone "
                     f"within {c['limit_s']:.0f} s of the last trial",
                     f"{c['rounds_ok']}/{c['rounds']} rounds ok, {c['kills']} kills, "
                     f"{c['trials_lost']} lost, worst {c['worst_last_trial_to_all_gone_s']:.1f} s",
                     "met" if c["rounds_ok"] == c["rounds"] and not c["trials_lost"]
                     else "missed"))
    if d := results.get("disk"):
        p = d["projection"]
        rows.append(("disk at 10,000 trials", "bounded with the default keep_models",
                     f"{d['default']['trials']} trials, 2 workers: peak "
                     f"{d['default']['peak_files']} models; projected {p['keep_all_gb']:.0f} "
                     f"GB (keep all) vs {p['default_peak_mb']:.0f} MB (keep 5)",
                     "met" if d["default"]["peak_files"] <= 5 + 2 else "missed"))
    if f := results.get("figures"):
        u = f["updates"][-1]
        rows.append(("figures", "(no goal) bytes per trial, seconds per update",
                     f"curve {f['curve']['json_bytes']} B per {f['curve']['epochs']}-epoch "
                     f"trial; one update {u['update_s_median']:.2f} s at {u['trials']} trials, "
                     f"throttled check {u['throttled_check_ms_median']:.1f} ms", "-"))
    if sc := results.get("scaling"):
        r = sc["runs"]
        rows.append(("scaling 1 → 2 workers", "(no goal) trials/h",
                     f"{r[0]['trials_per_hour_steady']:.0f} → "
                     f"{r[-1]['trials_per_hour_steady']:.0f} trials/h steady", "-"))
    return rows


def render(out: Path, timings: dict[str, float], total: float, quick: bool, note: str) -> str:
    results = {}
    for script in SCRIPTS:
        path = out / f"{RESULT_NAMES[script]}.json"
        if path.is_file():
            results[RESULT_NAMES[script]] = json.loads(path.read_text())
    m = next(iter(results.values()), {}).get("machine") or machine()
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    cmd = ".venv/bin/python benchmarks/run_all.py" + (" --quick" if quick else "")
    lines = ["# Benchmark results", ""]
    if note:
        lines += [f"> {note}", ""]
    lines += [
        f"Command: `{cmd}` (benchmark time {total / 60:.1f} min).",
        "Each section names its own script, which reruns it alone.", "",
        "## Machine", "",
        f"- {m['nproc']} CPU cores: {m['cpu']}; {m['memory_gib']} GiB memory; no GPU",
        f"- Python {m['python']} on {m['platform']}",
        f"- {versions}",
        f"- load average when the first benchmark started: "
        f"{', '.join(f'{x:.2f}' for x in m['load_average'])}",
        "- PostgreSQL 15 on the same machine (127.0.0.1, shares the 2 cores)", "",
        "## Goals", "",
        table(["benchmark", "goal", "measured", "verdict"], _goals(results)), ""]
    for name, result in results.items():
        script = next(s for s, n in RESULT_NAMES.items() if n == name)
        lines += [f"## {TITLES.get(name, name)}", "",
                  f"`.venv/bin/python benchmarks/{script}.py{' --quick' if quick else ''}` "
                  f"({timings.get(script, 0):.0f}s; measured {result.get('measured_at', '?')})",
                  ""]
        for t in result.get("tables", []):
            lines += [t, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
