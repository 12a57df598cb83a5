"""deploy/fleet-compose.yaml and the Kubernetes files in fleet mode, checked without an engine (docs/fleet.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from supervisor.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
FLEET_COMPOSE = ROOT / "deploy" / "fleet-compose.yaml"
KUBE = ROOT / "deploy" / "kubernetes"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_the_fleet_compose_file_runs_two_workers_on_one_postgresql(tmp_path: Path) -> None:
    env_file = tmp_path / "worker.env"
    env_file.write_text("API_KEY=not-a-real-key\nPOSTGRES_PASSWORD=not-a-real-password\n")
    done = subprocess.run(["docker-compose", "--env-file", str(env_file), "-f", str(FLEET_COMPOSE), "config"],
                          env={"PATH": "/usr/bin:/bin", "ENV_FILE": str(env_file)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {"postgres", "worker-a", "worker-b"}
    ids = set()
    for name in ("worker-a", "worker-b"):
        env = services[name]["environment"]
        settings = load_settings({**env, "API_HOST": "0.0.0.0"})  # the image's ENV
        assert settings.database_url == "postgresql://comfy:not-a-real-password@postgres:5432/comfy"
        assert "DATABASE_URL" not in settings.child_env  # kept from ComfyUI
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        ids.add(settings.worker_id)
    assert ids == {"worker-a", "worker-b"}
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "not-a-real-password"
    without = subprocess.run(["docker-compose", "-f", str(FLEET_COMPOSE), "config"], cwd=tmp_path,
                             env={"PATH": "/usr/bin:/bin", "ENV_FILE": str(env_file)}, capture_output=True,
                             text=True, timeout=60)
    assert without.returncode != 0 and "POSTGRES_PASSWORD" in without.stderr  # no default password


def test_kubernetes_pods_read_database_url_from_the_secret_and_are_named_in_the_fleet() -> None:
    [deployment] = [d for d in yaml.safe_load_all((KUBE / "deployment.yaml").read_text()) if d]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "DATABASE_URL" and ref["optional"] is True and "value" not in env["DATABASE_URL"]
    assert env["WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    [secret] = [d for d in yaml.safe_load_all((KUBE / "secret.example.yaml").read_text()) if d]
    assert secret["metadata"]["name"] == ref["name"]
    assert load_settings({"DATABASE_URL": secret["stringData"]["DATABASE_URL"]}).database_url
