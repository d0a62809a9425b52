"""Chaos: does a study always finish when workers are killed at random, even at its end?

Rounds of three real `tuner worker` processes on one PostgreSQL study (budget 6, a tiny model,
heartbeat 1 s, grace 3 s), each round with 1-3 kills drawn at random from ``kill -9`` of a
worker's parent, its child or its whole process group, and SIGTERM, at random moments from the
first trial to the last (a new worker starts in the killed one's place). See
``tests/chaos.py`` for the round itself; ``tests/test_chaos.py`` runs a short version in CI.

    .venv/bin/python benchmarks/bench_chaos.py            # 20 rounds (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_chaos.py --quick    # 1 round
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from _common import parse_args, table, throwaway_database, write_result  # noqa: E402
from chaos import GRACE, run_round  # noqa: E402


def main() -> int:
    args = parse_args(__doc__, lambda p: (
        p.add_argument("--rounds", type=int, default=20),
        p.add_argument("--seed", type=int, default=2026)))
    rounds = 1 if args.quick else args.rounds
    results = []
    with throwaway_database("tuner_chaos") as url, tempfile.TemporaryDirectory() as tmp:
        for n in range(rounds):
            r = run_round(url, Path(tmp), n, args.seed + n)
            results.append(r)
            print(f"round {n}: kills {r.kills}; {r.finished}/{r.budget} finished; "
                  f"last trial to all gone {r.last_trial_to_all_gone_s}s; "
                  f"{'ok' if r.ok else 'PROBLEMS: ' + '; '.join(r.problems)}", flush=True)
    kills = Counter(k for r in results for k in r.kills)
    worst = max((r.last_trial_to_all_gone_s or 0.0) for r in results)
    lost = sum(max(0, r.budget - r.finished) for r in results)
    extra = sum(max(0, r.finished - r.budget) for r in results)
    summary = {"rounds": rounds, "rounds_ok": sum(r.ok for r in results),
               "kills": sum(kills.values()), "kills_by_kind": dict(kills),
               "worst_last_trial_to_all_gone_s": worst, "limit_s": GRACE + 60,
               "trials_lost": lost, "trials_over_budget": extra,
               "left_running_or_waiting": sum(r.running + r.waiting for r in results)}
    tables = [
        table(["rounds", "rounds ok", "kills", "worst: last trial → all workers gone",
               "trials lost", "over budget", "left RUNNING/WAITING"],
              [[rounds, summary["rounds_ok"], summary["kills"], f"{worst:.1f} s "
                f"(limit {GRACE + 60:.0f} s)", lost, extra,
                summary["left_running_or_waiting"]]]),
        table(["kill", "times"], sorted(kills.items())),
        table(["round", "seed", "kills", "finished/budget", "failed (given back or dead)",
               "workers started", "last trial → all gone (s)", "round (s)", "result"],
              [[r.round, args.seed + r.round, ", ".join(r.kills), f"{r.finished}/{r.budget}",
                r.failed, r.workers_started, r.last_trial_to_all_gone_s, r.seconds,
                "ok" if r.ok else "; ".join(r.problems)[:200]] for r in results]),
    ]
    write_result(args, "chaos", {"summary": summary,
                                 "rounds": [r.as_dict() for r in results]}, tables)
    return 0 if summary["rounds_ok"] == rounds else 1


if __name__ == "__main__":
    sys.exit(main())
