"""deploy/kubernetes/: validated offline against Kubernetes 1.31's schemas, and checked against the worker itself.

The built-in kinds (Deployment, Service, Secret) go through ``kubernetes-validate`` (it ships the API's JSON
schemas, strict: an unknown field is an error). KEDA's ScaledObject is a custom resource with no schema there,
so its fields are checked here one by one. Beyond the schemas, the files must agree with the worker: the probe
paths it serves, its port, the variables it reads (each documented), the grace it needs on SIGTERM, the metric
the autoscaler queries.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from supervisor.config import load_settings
from supervisor.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.31.0"
BUILT_IN = {"Deployment", "Service", "Secret"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomized() -> list[dict[str, Any]]:
    """Every resource the kustomization lists, read from its files (what ``kubectl apply -k`` applies)."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in documents(KUBE / name)]


def one(kind: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    [doc] = [d for d in (docs if docs is not None else kustomized()) if d["kind"] == kind]
    return doc


def worker_container() -> dict[str, Any]:
    [container] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def container_env() -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in worker_container()["env"]}


def test_every_built_in_resource_passes_the_schema_of_kubernetes_1_31() -> None:
    docs = kustomized() + documents(KUBE / "secret.example.yaml")
    kinds = {d["kind"] for d in docs}
    assert kinds == BUILT_IN | {"ScaledObject"}, kinds
    for doc in docs:
        if doc["kind"] in BUILT_IN:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError with the path


def test_the_validator_does_refuse_a_broken_deployment() -> None:
    broken = one("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    typo = one("Service")
    typo["spec"]["selectr"] = typo["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_the_deployment_fits_the_worker() -> None:
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = worker_container()
    env = container_env()
    settings = load_settings({**env, "API_KEY": "x", "API_HOST": "0.0.0.0", "API_PORT": "8000"})  # the image's ENV
    # probes: liveness on /health, readiness on /ready, on the port the API listens on
    [port] = container["ports"]
    assert port["containerPort"] == settings.api_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    # SIGTERM: the drain and ComfyUI's stop fit within the grace the kubelet gives
    needed = settings.shutdown_grace_s + 2 * settings.stop_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= needed + 5, (pod["terminationGracePeriodSeconds"], needed)
    assert pod["terminationGracePeriodSeconds"] <= needed + 30  # matched, not just large
    # non-root, no privilege escalation
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # a GPU, and one ComfyUI per GPU the pod gets
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert env["COMFYUI_INSTANCES"] == "auto"
    # the data volume at DATA_DIR (the image's /data)
    [mount] = container["volumeMounts"]
    assert mount["mountPath"] == "/data" and mount["name"] in {v["name"] for v in pod["volumes"]}
    # the API key from the Secret the example creates, never inline
    [key] = [e for e in container["env"] if e["name"] == "API_KEY"]
    secret = one("Secret", documents(KUBE / "secret.example.yaml"))
    assert "value" not in key and key["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                     "key": "API_KEY"}
    assert "API_KEY" in secret["stringData"]


def test_every_variable_set_is_one_the_worker_documents() -> None:
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", (ROOT / "docs" / "configuration.md").read_text(), re.M))
    for e in worker_container()["env"]:
        assert e["name"] in documented, f"{e['name']} is not in docs/configuration.md"


def test_the_service_reaches_the_pods() -> None:
    service, deployment = one("Service"), one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in worker_container()["ports"]}


def test_the_scaled_object_scales_the_deployment_on_the_queue_depth() -> None:
    scaled = one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert all(isinstance(spec[k], int) and spec[k] > 0 for k in ("pollingInterval", "cooldownPeriod"))
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert set(meta) == {"serverAddress", "query", "threshold"}
    assert re.fullmatch(r"https?://[\w.-]+(:\d+)?/?", meta["serverAddress"]), meta["serverAddress"]
    assert isinstance(meta["threshold"], str) and float(meta["threshold"]) > 0  # KEDA wants a string
    names = set(re.findall(r"comfyui_worker_\w+", meta["query"]))
    assert "comfyui_worker_queue_depth" in names
    served = {family.name for family in WorkerMetrics().registry.collect()}
    assert names <= served, names - served  # every metric the query reads is one the worker serves


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed; the files were checked above")
def test_kubectl_kustomize_renders_the_files_with_the_image_set() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60,
                              check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert sorted(d["kind"] for d in docs) == ["Deployment", "ScaledObject", "Service"]
    [container] = one("Deployment", docs)["spec"]["template"]["spec"]["containers"]
    images = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["images"][0]
    assert container["image"] == f"{images['newName']}:{images['newTag']}"
    for doc in docs:
        if doc["kind"] in BUILT_IN:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
