"""A short chaos run in CI: real workers killed at random, every round must end exactly at its
budget with every worker gone (see ``tests/chaos.py``; ``benchmarks/bench_chaos.py`` runs 20)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from chaos import run_round

pytestmark = pytest.mark.slow


def test_chaos_rounds(tmp_path: Path, pg_url: str) -> None:
    rounds = int(os.environ.get("TUNER_CHAOS_ROUNDS", "2"))
    seed = random.randrange(1_000_000)
    results = [run_round(pg_url, tmp_path, n, seed + n) for n in range(rounds)]
    for r in results:
        print(f"\n[chaos] round {r.round} (seed {seed + r.round}): kills {r.kills}; "
              f"{r.finished}/{r.budget} finished, {r.failed} failed, {r.running} running, "
              f"{r.waiting} waiting; {r.workers_started} workers; last trial to all gone "
              f"{r.last_trial_to_all_gone_s}s; {r.seconds}s")
    problems = [f"round {r.round} (seed {seed + r.round}): {p}" for r in results
                for p in r.problems]
    assert not problems, "\n".join(problems)
