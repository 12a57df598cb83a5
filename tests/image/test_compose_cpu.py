"""deploy/compose.yaml, CPU variant, started for real: Debian's docker-compose 1.29 (what CI has) on the running
engine, with the image `make build-cpu` makes. It must come up healthy (its healthcheck asks /ready), serve a job
with the API key from its env file, and stop cleanly (running jobs drained, exit 0), its named volume removed
with ``down -v``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.api import Api, png_of
from tests.helpers.standin import free_port
from tests.image.imagekit import ROOT, ImageUnderTest, in_ci, wait_for
from tests.image.test_cpu_image import BUILD_TIMEOUT_S, cpu_image  # noqa: F401 - the fixture, built once here too

COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
EXAMPLE = json.loads((ROOT / "examples" / "runsync_no_models.json").read_text())

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 300)


def compose_cli() -> str:
    """docker-compose (1.29 from Debian, as CI installs it): a skip without it, but a failure under CI."""
    found = shutil.which("docker-compose")
    if found is None:
        why = "docker-compose is not installed (Debian: apt-get install docker-compose)"
        if in_ci():
            pytest.fail(f"the compose test cannot run under CI: {why}", pytrace=False)
        pytest.skip(why)
    return found


class ComposeProject:
    """One project of deploy/compose.yaml under a unique name, driven with docker-compose."""

    def __init__(self, cli: str, env: dict[str, str], log: Path) -> None:
        self.cli = cli
        self.name = f"cwtest{uuid.uuid4().hex[:10]}"
        self.env = env
        self.log = log

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        cmd = [self.cli, "-p", self.name, "-f", str(COMPOSE_FILE), "--profile", "cpu", *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}(exit {done.returncode})\n")
        return done

    def container(self, engine: Any) -> Any:
        [one] = engine.containers.list(all=True, filters={"label": f"com.docker.compose.project={self.name}"})
        return one


@pytest.fixture
def project(tmp_path: Path, cpu_image: ImageUnderTest, engine: Any) -> Iterator[ComposeProject]:  # noqa: F811
    cli = compose_cli()
    env_file = tmp_path / "worker.env"
    key = secrets.token_urlsafe(24)
    env_file.write_text(f"API_KEY={key}\n")
    env = {**os.environ, "ENV_FILE": str(env_file), "PORT": str(free_port()), "CPU_IMAGE": cpu_image.ref,
           "API_KEY_FOR_TEST": key}
    proj = ComposeProject(cli, env, tmp_path / "compose.log")
    try:
        yield proj
    finally:
        proj.run("down", "-v", "--remove-orphans", "-t", "10")
        volumes = engine.volumes.list(filters={"label": f"com.docker.compose.project={proj.name}"})
        for volume in volumes:
            volume.remove(force=True)


def test_the_cpu_compose_service_comes_up_healthy_serves_a_job_and_stops_cleanly(project: ComposeProject,
                                                                                 engine: Any) -> None:
    up = project.run("up", "-d", "worker-cpu")
    assert up.returncode == 0, project.log.read_text()
    container = project.container(engine)
    assert container.attrs["Config"]["Healthcheck"]["Test"][-1].endswith("/ready', timeout=5)")

    def healthy() -> bool:
        container.reload()
        if container.status == "exited":
            raise AssertionError(f"the worker exited:\n{container.logs().decode()[-3000:]}")
        return container.attrs["State"].get("Health", {}).get("Status") == "healthy"

    wait_for(healthy, 120, "the compose service to be healthy (its healthcheck asks /ready)")
    api = Api(f"http://127.0.0.1:{project.env['PORT']}", project.env["API_KEY_FOR_TEST"])
    status, _ = api.post("/runsync", EXAMPLE, key=None)
    assert status == 401  # the key from the env file is required
    body = api.ok("POST", "/runsync", EXAMPLE)
    assert body["status"] == "COMPLETED", body
    assert png_of(body["output"]["images"][0]["data"]).size == (512, 512)
    volume = f"{project.name}_data"
    assert any(m.get("Name") == volume and m["Destination"] == "/data" for m in container.attrs["Mounts"])

    stop = project.run("stop", "-t", "55")
    assert stop.returncode == 0, project.log.read_text()
    container.reload()
    logs = container.logs().decode()
    assert container.attrs["State"]["ExitCode"] == 0, logs[-3000:]
    assert "stop requested: no new jobs" in logs and "API listening on http://0.0.0.0:8000 (auth: bearer token" in logs

    down = project.run("down", "-v")
    assert down.returncode == 0, project.log.read_text()
    assert not engine.volumes.list(filters={"name": volume})
