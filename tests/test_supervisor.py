"""Which child gets which device, and what happens when one exits: the supervisor's decisions,
checked with explicit device lists (no GPU needed)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import fake_nvidia_smi, run_tuner, write_study

from tuner.errors import UserError
from tuner.supervisor import (
    EXIT_CRASHED,
    EXIT_DONE,
    EXIT_STOPPED,
    MAX_RESTARTS,
    STABLE_SECONDS,
    Slot,
    next_step,
    parse_gpus,
    plan_children,
)


def test_gpus_none_and_explicit_lists() -> None:
    assert parse_gpus("none") == []
    assert parse_gpus("0,2", discover=False) == ["0", "2"]
    assert parse_gpus(" 3 ", discover=False) == ["3"]
    assert parse_gpus("GPU-8f6e2c1a-1b2c-3d4e") == ["GPU-8f6e2c1a-1b2c-3d4e"]


def test_gpus_all_honours_cuda_visible_devices_without_probing() -> None:
    assert parse_gpus("all", visible="1,3") == ["1", "3"]
    assert parse_gpus("all", visible="") == []  # the user hid every GPU: CPU
    assert parse_gpus("all", visible="-1") == []
    assert parse_gpus("all", visible=None, discover=False) == []


@pytest.mark.parametrize("text", ["0,,2", "a", "0;1", "1,1", "-1"])
def test_bad_gpu_lists_are_user_errors(text: str) -> None:
    with pytest.raises(UserError, match="--gpus"):
        parse_gpus(text)


def test_one_child_per_gpu() -> None:
    slots = plan_children(["0", "2"])
    assert slots == [Slot(0, "0"), Slot(1, "2")]
    assert [s.label for s in slots] == ["gpu0", "gpu2"]


def test_k_children_per_gpu_are_spread_gpu_by_gpu() -> None:
    slots = plan_children(["0", "1"], trials_per_gpu=3)
    assert [s.device for s in slots] == ["0", "0", "0", "1", "1", "1"]
    assert [s.index for s in slots] == list(range(6))  # distinct seed offsets
    assert [s.label for s in slots] == ["gpu0", "gpu0.1", "gpu0.2", "gpu1", "gpu1.1", "gpu1.2"]


def test_no_gpu_means_cpu_children() -> None:
    assert plan_children([]) == [Slot(0, "")]
    assert [s.label for s in plan_children([], 2)] == ["cpu", "cpu.1"]
    with pytest.raises(UserError):
        plan_children(["0"], 0)


def test_clean_exit_and_stop_requests_are_never_restarted() -> None:
    assert next_step(EXIT_DONE, 0, 5.0, stopping=False) == ("done", 0.0)
    assert next_step(-signal.SIGKILL, 0, 5.0, stopping=True) == ("done", 0.0)


def test_a_child_that_stopped_with_a_message_is_not_restarted() -> None:
    assert next_step(EXIT_STOPPED, 0, 5.0, stopping=False)[0] == "stopped"
    assert next_step(2, 0, 5.0, stopping=False)[0] == "stopped"


def test_killed_or_crashed_children_restart_with_growing_pauses_then_give_up() -> None:
    pauses = [next_step(-signal.SIGKILL, n, 5.0, stopping=False) for n in range(MAX_RESTARTS)]
    assert all(action == "restart" for action, _ in pauses)
    assert [p for _, p in pauses] == [1, 2, 4, 8, 16]  # as the README's failure table says
    assert next_step(EXIT_CRASHED, MAX_RESTARTS, 5.0, stopping=False) == ("give-up", 0.0)
    # a child that ran well for a long time before dying gets a fresh count
    assert next_step(-signal.SIGSEGV, MAX_RESTARTS, STABLE_SECONDS, False)[0] == "restart"


def test_unknown_study_is_a_user_error_before_any_child_starts(tmp_path: Path,
                                                               pg_url: str) -> None:
    write_study(tmp_path, "known")
    assert run_tuner("create", str(tmp_path / "known.toml"), "--storage", pg_url).returncode == 0
    result = run_tuner("worker", "--study", "knwon", "--storage", pg_url, "--gpus", "none")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tuner: error: unknown study 'knwon': did you mean 'known'?"]
    assert "started process" not in result.stdout


def _node_with_gpus(tmp_path: Path, count: int) -> dict[str, str]:
    """PATH with an ``nvidia-smi`` that lists ``count`` GPUs."""
    return {"PATH": f"{fake_nvidia_smi(tmp_path / 'node-bin', count)}:{os.environ['PATH']}"}


def test_a_gpu_index_the_node_lacks_is_a_user_error(tmp_path: Path, pg_url: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Else its process would see no GPU and train on the CPU, and nothing would say so."""
    node = _node_with_gpus(tmp_path, 2)
    monkeypatch.setenv("PATH", node["PATH"])
    assert parse_gpus("0,1") == ["0", "1"]
    with pytest.raises(UserError, match="no GPU 2; nvidia-smi -L lists 0, 1"):
        parse_gpus("0,2")
    write_study(tmp_path, "gpus")
    assert run_tuner("create", str(tmp_path / "gpus.toml"), "--storage", pg_url).returncode == 0
    result = run_tuner("worker", "--study", "gpus", "--storage", pg_url, "--gpus", "1,2",
                       env=node)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tuner: error: --gpus: this node has no GPU 2; nvidia-smi -L lists 0, 1 "
        "(or use --gpus all)"]
    assert "started process" not in result.stdout


def test_a_process_pinned_to_a_gpu_tensorflow_cannot_see_says_so(tmp_path: Path,
                                                                 pg_url: str) -> None:
    """The usual cause on a GPU node: TensorFlow installed without its CUDA libraries. The
    trials still run (on the CPU), and the log says why they are slow and what to install."""
    write_study(tmp_path, "pinned", n_trials=2, epochs=1)
    assert run_tuner("create", str(tmp_path / "pinned.toml"), "--storage",
                     pg_url).returncode == 0
    result = run_tuner("worker", "--study", "pinned", "--storage", pg_url, "--gpus", "0",
                       "--n-trials", "1", env=_node_with_gpus(tmp_path, 1))
    assert result.returncode == 0, result.stderr
    assert "[gpu0] warning: TensorFlow sees no GPU, though CUDA_VISIBLE_DEVICES=0: trials " \
        "train on the CPU." in result.stdout, result.stdout
    assert "pip install 'tensorflow[and-cuda]==2." in result.stdout
    assert "[gpu0] trial    0  COMPLETE" in result.stdout
    cpu = run_tuner("run", str(tmp_path / "pinned.toml"), "--storage", pg_url, "--n-trials",
                    "1", env={"CUDA_VISIBLE_DEVICES": ""})
    assert cpu.returncode == 0 and "trial    1  COMPLETE" in cpu.stdout, cpu.stdout
    assert "sees no GPU" not in cpu.stdout  # nothing pinned: the CPU is what was asked for


def test_a_python_without_tensorflow_is_one_line_and_no_restarts(tmp_path: Path,
                                                                 pg_url: str) -> None:
    """A node whose Python cannot import TensorFlow (installed without tuner's dependencies,
    or a broken CUDA build): restarting the child would fail the same way six times over."""
    broken = tmp_path / "broken" / "tensorflow"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    node = {"PYTHONPATH": str(broken.parent)}
    write_study(tmp_path, "notf", n_trials=1, epochs=1)
    assert run_tuner("create", str(tmp_path / "notf.toml"), "--storage",
                     pg_url).returncode == 0  # creating a study needs no TensorFlow
    expected = ("cannot import TensorFlow (libcudart.so.12: cannot open shared object file); "
                "trials train with it. Install tuner with its dependencies into the Python "
                "that runs them (")
    worker = run_tuner("worker", "--study", "notf", "--storage", pg_url, "--gpus", "none",
                       env=node, timeout=120)
    assert worker.returncode == 1, worker.stdout + worker.stderr
    lines = worker.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tuner: error: [cpu] {expected}"), lines
    assert lines[0].endswith("): pip install . in a checkout of tuner")
    assert worker.stdout.count("started process") == 1  # not restarted
    run = run_tuner("run", str(tmp_path / "notf.toml"), "--storage", pg_url, env=node,
                    timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"tuner: error: {expected}")


def test_a_stop_signal_that_arrives_while_a_child_starts_reaches_that_child(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM lands while ``Popen`` runs: the handler cannot see the new child yet. It must
    be told to stop all the same, not train on until it is killed 20 s later."""
    import io
    import subprocess
    import sys

    from tuner import supervisor as sup

    supervisor = sup._Supervisor("sqlite:///unused.db", "s", plan_children([], 1), tmp_path,
                                 io.StringIO(), n_trials=None, timeout=None, artifacts=None)
    real_popen = subprocess.Popen

    def popen_interrupted(args, **kwargs):  # noqa: ANN001, ANN202 - Popen's own signature
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(60)"])
        supervisor._on_signal(signal.SIGTERM, None)  # the signal, before Popen returns
        return proc

    monkeypatch.setattr(sup.subprocess, "Popen", popen_interrupted)
    supervisor._start(supervisor.children[0])
    proc = supervisor.children[0].proc
    try:
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()
