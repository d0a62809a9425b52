"""The Kubernetes manifests in ``deploy/k8s``, checked without a cluster.

Every object is validated against the Kubernetes API schemas of ``kubernetes-validate``
(offline, strict: an unknown or misplaced field fails), for the oldest Kubernetes release the
manifests need (1.31, where Job pod failure policies are GA) and the newest the package knows.
The tests below check what a schema cannot: no password on any command line, GPUs requested,
time to hand a trial back, the image the Dockerfile builds, a dashboard kept inside the cluster.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import sqlalchemy
import yaml

from tuner.supervisor import STOP_GRACE_SECONDS

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
OLDEST = "1.31.0"
VERSIONS = [OLDEST, kubernetes_validate.latest_version()]
IMAGE = "tuner-worker:latest"
MADE_BY_THE_USER = {("Secret", "tuner-db"), ("ConfigMap", "tuner-study")}  # README says how


def _load() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path != KUSTOMIZATION:
            docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


DOCS = _load()


def _objects(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == kind}


def _pod_specs() -> Iterator[tuple[str, dict]]:
    for _, doc in DOCS:
        if doc["kind"] in ("Job", "Deployment"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _containers() -> Iterator[tuple[str, dict]]:
    for name, spec in _pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{name}/{c['name']}", c


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("file", "doc"), DOCS, ids=[f"{f}:{d['kind']}" for f, d in DOCS])
def test_manifest_is_valid_against_the_api_schema(file: str, doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{file}: {doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}",
                    pytrace=False)


def test_the_validator_rejects_a_misplaced_field() -> None:
    """Strict mode is on: a field in the wrong place fails, not only a wrong type."""
    job = yaml.safe_load((K8S / "worker-job.yaml").read_text())
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, OLDEST, strict=True)


def test_kustomization_applies_every_manifest_and_names_the_image() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {KUSTOMIZATION.name}
    assert set(kustomization["resources"]) == files
    (image,) = kustomization["images"]
    assert f"{image['newName']}:{image['newTag']}" == IMAGE
    assert image["name"] == IMAGE.split(":")[0]


def test_image_is_the_one_the_dockerfile_builds() -> None:
    assert f"docker build -t {IMAGE} ." in (REPO / "Dockerfile").read_text()
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert compose["x-tuner"]["image"] == IMAGE
    images = {name: c["image"] for name, c in _containers()}
    assert images and set(images.values()) == {IMAGE}, images


def test_no_password_on_any_command_line() -> None:
    url_with_password = re.compile(r"://[^/@\s]*:[^/@\s]*@")
    for name, container in _containers():
        for word in container.get("command", []) + container.get("args", []):
            assert not url_with_password.search(word), (name, word)
            assert "password" not in word.lower() and "--storage" not in word, (name, word)
        for var in container.get("env", []):
            if "PASSWORD" in var["name"]:
                assert "value" not in var, (name, var)
                assert var["valueFrom"]["secretKeyRef"] == {"name": "tuner-db",
                                                            "key": "password"}, (name, var)
    for data in (cm["data"] for cm in _objects("ConfigMap").values()):
        for key, value in data.items():
            assert not url_with_password.search(value), key
    storage = _objects("ConfigMap")["tuner-config"]["data"]["TUNER_STORAGE"]
    assert sqlalchemy.engine.make_url(storage).password is None


def test_every_tuner_container_gets_the_password_from_the_secret() -> None:
    for name, container in _containers():
        env = {v["name"]: v for v in container.get("env", [])}
        assert "PGPASSWORD" in env, name  # libpq reads it; the URL holds none
        assert {"configMapRef": {"name": "tuner-config"}} in container["envFrom"], name


def test_workers_request_gpus_and_use_exactly_those() -> None:
    job = _objects("Job")["tuner-worker"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["parallelism"] == job["spec"]["completions"] >= 1
    (worker,) = job["spec"]["template"]["spec"]["containers"]
    resources = worker["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    if "nvidia.com/gpu" in resources.get("requests", {}):
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert worker["args"] == ["worker", "--study", "$(TUNER_STUDY)", "--gpus", "all"]
    assert "TUNER_STUDY" in _objects("ConfigMap")["tuner-config"]["data"]
    for name, c in _containers():  # only the workers hold GPUs
        if c is not worker:
            assert "nvidia.com/gpu" not in str(c.get("resources")), name


def test_grace_period_covers_handing_the_trial_back() -> None:
    spec = _objects("Job")["tuner-worker"]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= STOP_GRACE_SECONDS + 10
    rules = _objects("Job")["tuner-worker"]["spec"]["podFailurePolicy"]["rules"]
    fail_job = [r for r in rules if r["action"] == "FailJob"]
    assert fail_job and fail_job[0]["onExitCodes"]["values"] == [2]  # user errors stop it
    assert fail_job[0]["onExitCodes"]["containerName"] == "worker"


def test_an_evicted_worker_fails_so_that_the_job_replaces_it() -> None:
    """A worker stopped by SIGTERM exits 0 by default; a pod that exits 0 counts as done, and
    the DisruptionTarget rule (which ignores evictions) applies only to failed pods."""
    job = _objects("Job")["tuner-worker"]["spec"]
    (worker,) = job["template"]["spec"]["containers"]
    env = {v["name"]: v.get("value") for v in worker["env"]}
    assert int(env["TUNER_SIGNAL_EXIT_CODE"]) not in (0, 2)  # 2 would fail the whole Job
    ignored = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    assert ignored[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def test_the_pods_carry_the_label_the_readme_selects_them_by() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                           check=True, timeout=60).stdout
    assert "kubectl get pods -l app.kubernetes.io/part-of=tuner" in \
        (REPO / "README.md").read_text()
    for doc in yaml.safe_load_all(built):
        if doc and doc["kind"] in ("Job", "Deployment"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert labels.get("app.kubernetes.io/part-of") == "tuner", doc["metadata"]["name"]


def test_workers_wait_for_the_study_that_the_create_job_registers() -> None:
    create = _objects("Job")["tuner-create"]["spec"]["template"]["spec"]
    (container,) = create["containers"]
    assert container["args"] == ["create", "/app/studies/study.toml"]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in create["volumes"] if v["name"] == mount["name"]]
    assert mount["mountPath"] == "/app/studies" and volume["configMap"]["name"] == "tuner-study"
    worker = _objects("Job")["tuner-worker"]["spec"]["template"]["spec"]
    (wait,) = worker["initContainers"]
    assert 'tuner status --study "$TUNER_STUDY"' in " ".join(wait["command"])


def test_dashboard_is_not_exposed_outside_the_cluster() -> None:
    assert not {d["kind"] for _, d in DOCS} & {"Ingress", "Gateway", "HTTPRoute", "Route"}
    (service,) = _objects("Service").values()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not {"externalIPs", "loadBalancerIP", "externalName"} & set(service["spec"])
    assert all("nodePort" not in p for p in service["spec"]["ports"])
    deployment = _objects("Deployment")["tuner-dashboard"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name, spec in _pod_specs():
        assert not spec.get("hostNetwork"), name
    for name, c in _containers():
        assert all("hostPort" not in p for p in c.get("ports", [])), name


def test_pods_run_as_the_images_unprivileged_user() -> None:
    for name, spec in _pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 1000, name  # USER 1000:1000
    for name, c in _containers():
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_every_reference_is_to_an_object_here_or_one_the_readme_creates() -> None:
    here = {(d["kind"], d["metadata"]["name"]) for _, d in DOCS} | MADE_BY_THE_USER
    for name, spec in _pod_specs():
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in here, name
    for name, c in _containers():
        for source in c.get("envFrom", []):
            assert ("ConfigMap", source["configMapRef"]["name"]) in here, name
        for var in c.get("env", []):
            if "secretKeyRef" in var.get("valueFrom", {}):
                assert ("Secret", var["valueFrom"]["secretKeyRef"]["name"]) in here, name
    readme = (REPO / "README.md").read_text()
    assert "kubectl create secret generic tuner-db" in readme
    assert "kubectl create configmap tuner-study --from-file=study.toml=" in readme


def test_default_study_is_the_demo_file() -> None:
    import tomllib

    demo = tomllib.loads((REPO / "studies" / "digits_demo.toml").read_text())
    assert _objects("ConfigMap")["tuner-config"]["data"]["TUNER_STUDY"] == demo["study"]["name"]
