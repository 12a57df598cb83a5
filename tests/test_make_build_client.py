"""`make build` finds a docker client that builds with BuildKit by itself (a `docker` with the buildx plugin, or
the engine's own /usr/bin/docker), or says in one line what to install or set -- before anything runs.

The clients are real where the machine has them (here: /usr/local/bin/docker 28.x without buildx on PATH, and
Debian's /usr/bin/docker 20.10, the engine's own client); a client *with* buildx is a small script on PATH that
answers like one (`docker --version`, `docker buildx version`), since no such client is installed here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

MAKE_ERROR = re.compile(r"^make(\[\d+\])?: \*\*\* ")

ROOT = Path(__file__).resolve().parents[1]
ENGINE_CLIENT = "/usr/bin/docker"
MAKE_VARS = ("DOCKER", "MAKEFLAGS", "MFLAGS", "IMAGE", "TAG", "REGISTRY", "BASE_IMAGE", "BUILD_ARGS", "BUILD_FLAGS",
             "HF_TOKEN_FILE", "CIVITAI_TOKEN_FILE")

pytestmark = pytest.mark.timeout(60)


def docker_version(client: str) -> str | None:
    try:
        out = subprocess.run([client, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return None
    return out.split()[2].rstrip(",") if out.startswith("Docker version ") else None


def has_buildx(client: str) -> bool:
    return subprocess.run([client, "buildx", "version"], capture_output=True, timeout=10).returncode == 0


def client_without_buildx() -> str:
    """A real docker client of 23 or newer without the buildx plugin (what `make build` must not pick)."""
    for client in ("/usr/local/bin/docker", "/usr/bin/docker"):
        version = docker_version(client)
        if version and int(version.split(".")[0]) >= 23 and not has_buildx(client):
            return client
    pytest.skip("no docker client 23+ without buildx on this machine")


def engine_client_builds() -> bool:
    version = docker_version(ENGINE_CLIENT)
    return bool(version) and (int(version.split(".")[0]) < 23 or has_buildx(ENGINE_CLIENT))


def path_with_docker(tmp_path: Path, docker: str | None) -> str:
    """PATH whose `docker` is ``docker`` (a symlink; None: a PATH with no docker before /usr/bin)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if docker:
        (bin_dir / "docker").symlink_to(docker)
    return f"{bin_dir}:/usr/bin:/bin"


def make(args: list[str], path: str, dry_run: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in MAKE_VARS}
    env["PATH"] = path
    return subprocess.run(["make", "--no-print-directory", *(["-n"] if dry_run else []), "-C", str(ROOT), *args],
                          env=env, capture_output=True, text=True, timeout=30)


def build_line(run: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in run.stdout.splitlines() if line.startswith("DOCKER_BUILDKIT=1 ")]
    assert len(lines) == 1, run.stdout + run.stderr
    return lines[0]


def test_without_buildx_on_path_the_engines_own_client_builds(tmp_path: Path) -> None:
    if not engine_client_builds():
        pytest.skip(f"no {ENGINE_CLIENT} that builds with BuildKit here")
    run = make(["build"], path_with_docker(tmp_path, client_without_buildx()))
    assert run.returncode == 0, run.stderr
    assert build_line(run).startswith(f"DOCKER_BUILDKIT=1 {ENGINE_CLIENT} build --progress=auto -f ./build/model-layers/Dockerfile")
    assert f"with {ENGINE_CLIENT}" in run.stdout  # the ">> building ..." line says which client


def test_a_docker_with_buildx_on_path_is_used_as_docker(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text('#!/bin/sh\ncase "$1" in\n  --version) echo "Docker version 27.5.1, build 9f9e405";;\n'
                    '  buildx) echo "github.com/docker/buildx v0.20.1";;\n  *) exit 1;;\nesac\n')
    fake.chmod(0o755)
    run = make(["build"], f"{bin_dir}:/usr/bin:/bin")
    assert run.returncode == 0, run.stderr
    assert build_line(run).startswith("DOCKER_BUILDKIT=1 docker build ")


def test_a_docker_without_buildx_set_by_the_user_is_refused_in_one_line(tmp_path: Path) -> None:
    client = client_without_buildx()
    version = docker_version(client)
    run = make(["build", f"DOCKER={client}"], path_with_docker(tmp_path, None), dry_run=False)
    assert run.returncode != 0
    ours = [line for line in run.stderr.splitlines() if not MAKE_ERROR.match(line)]  # make's own, at any MAKELEVEL
    hint = (f", or set DOCKER={ENGINE_CLIENT} (the engine's own client, which can)" if engine_client_builds()
            and client != ENGINE_CLIENT else ", or set DOCKER to a client that has buildx")
    assert ours == [f"make build: DOCKER={client} is Docker {version} without the buildx plugin, so it cannot build "
                    f"with BuildKit: install the plugin (docker-buildx-plugin){hint}"], run.stderr
    assert ">> building" not in run.stdout, "the build started"


def test_a_client_that_is_no_docker_is_named(tmp_path: Path) -> None:
    run = make(["build", "DOCKER=/bin/true"], path_with_docker(tmp_path, None), dry_run=False)
    assert run.returncode != 0
    assert run.stderr.splitlines()[0].startswith(
        "make build: DOCKER=/bin/true is not a docker client (`/bin/true --version` does not say 'Docker version')")


def test_the_engines_own_client_set_by_the_user_is_kept(tmp_path: Path) -> None:
    if not engine_client_builds():
        pytest.skip(f"no {ENGINE_CLIENT} that builds with BuildKit here")
    run = make(["build", f"DOCKER={ENGINE_CLIENT}"], path_with_docker(tmp_path, client_without_buildx()))
    assert build_line(run).startswith(f"DOCKER_BUILDKIT=1 {ENGINE_CLIENT} build ")
