"""deploy/compose.yaml, checked without an engine: what each service must have, and docker-compose's own verdict.

The CPU service is also started for real with the engine (tests/image/test_compose_cpu.py); the GPU service
cannot run on these machines, so its GPU reservation, data volume, secrets and healthcheck are checked here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # YAML merge keys (<<) resolved, as Compose does


def seconds(text: str) -> float:
    value, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * (60 if unit == "m" else 1)


@pytest.mark.parametrize("name", ["worker", "worker-cpu"])
def test_each_service_serves_behind_its_healthcheck_with_the_key_from_the_env_file(name: str) -> None:
    service = compose()["services"][name]
    env = service["environment"]
    assert "API_KEY" not in env and service["env_file"] == "${ENV_FILE:-../.env}"
    settings = load_settings({**{k: str(v) for k, v in env.items()}, "API_KEY": "x", "API_HOST": "0.0.0.0"})
    assert settings.worker_mode == "http"
    assert service["ports"] == [f"127.0.0.1:${{PORT:-8000}}:{settings.api_port}"]  # loopback only
    assert "data:/data" in service["volumes"] and "data" in compose()["volumes"]  # the named volume at DATA_DIR
    check = service["healthcheck"]["test"]
    assert check[0] == "CMD" and f"http://127.0.0.1:{settings.api_port}/ready" in check[-1]
    assert seconds(service["stop_grace_period"]) >= settings.shutdown_grace_s + 2 * settings.stop_timeout_s + 5


def test_the_gpu_service_reserves_every_gpu_and_runs_one_comfyui_on_each() -> None:
    service = compose()["services"]["worker"]
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert service["environment"]["COMFYUI_INSTANCES"] == "auto" and "profiles" not in service
    cpu = compose()["services"]["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu and cpu["environment"]["COMFYUI_ARGS"] == "--cpu"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    env_file = tmp_path / "worker.env"
    env_file.write_text("API_KEY=not-a-real-key\n")
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "--profile", "cpu", "config"],
                          env={"PATH": "/usr/bin:/bin", "ENV_FILE": str(env_file)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    assert set(rendered["services"]) == {"worker", "worker-cpu"}
    assert rendered["services"]["worker"]["image"] == "comfyui-worker:latest"
    assert rendered["services"]["worker-cpu"]["environment"]["API_KEY"] == "not-a-real-key"
