"""The Makefile's image targets, dry-run: the exact docker commands users get (no engine needed)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# The Makefile's variables (`?=`) take values from the environment: expect its defaults whatever the shell has.
MAKE_VARS = ("DOCKER", "REGISTRY", "BUILD_REVISION", "BUILD_SOURCE", "BUILD_CREATED", "LABELS", "IMAGE", "TAG", "BASE_IMAGE", "COMFYUI_REF", "DOCKERFILE", "CONTEXT", "PROGRESS",
             "HF_TOKEN_FILE", "CIVITAI_TOKEN_FILE", "BUILD_ARGS", "BUILD_FLAGS", "ENV_FILE", "DATA_VOLUME",
             "HOST_ADDR", "PORT", "GPUS", "RUN_FLAGS", "CONTAINER", "MAKEFLAGS", "MFLAGS", "MODELS_MANIFEST",
             "MODEL_GROUP_MB", "MODEL_LAYERS")
ENV = {k: v for k, v in os.environ.items() if k not in MAKE_VARS}


def make_n(*args: str) -> list[str]:
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-C", str(ROOT), *args], text=True,
                          capture_output=True, timeout=30, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def docker_line(lines: list[str], verb: str, count: int = 1) -> str:
    """The first of the ``count`` lines that run ``docker VERB`` (build: the image, then its labels)."""
    found = [line for line in lines if re.search(rf"(^|\s)\S*docker {verb} ", line)]
    assert len(found) == count, lines
    return found[0]


STAMP = ("--build-arg BUILD_REVISION=r1 --build-arg 'BUILD_SOURCE=https://example.com/w.git' "
         "--build-arg BUILD_CREATED=2026-01-31T12:00:00Z")
STAMP_VARS = ("BUILD_REVISION=r1", "BUILD_SOURCE=https://example.com/w.git", "BUILD_CREATED=2026-01-31T12:00:00Z")


def test_make_n_build_shows_the_exact_buildkit_command() -> None:
    # DOCKER unset: the client docker/buildkit-client.sh finds here (which one: tests/test_make_build_client.py)
    client = subprocess.run(["bash", str(ROOT / "docker" / "buildkit-client.sh")], capture_output=True, text=True,
                            timeout=30, env=ENV).stdout.strip()
    if not client:
        pytest.skip("no docker client here builds with BuildKit")
    lines = make_n("build", *STAMP_VARS)
    line = docker_line(lines, "build", count=2)
    # the Dockerfile with one layer per model, generated from models.yaml first (scripts/model_layers.py)
    assert ("python3 scripts/model_layers.py --manifest ./models.yaml --dockerfile docker/Dockerfile --context . "
            "--out ./build/model-layers --group-mb 0") in lines, lines
    assert line == (f"DOCKER_BUILDKIT=1 {client} build --progress=auto -f ./build/model-layers/Dockerfile "
                    f"-t comfyui-worker:latest --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 {STAMP} .")
    # unset, the stamp is this checkout's commit and the time now; the labels pass is the second docker build
    lines = make_n("build")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert re.search(rf"--build-arg BUILD_REVISION={head.strip()}(-dirty)? --build-arg 'BUILD_SOURCE=[^' ]*' "
                     r"--build-arg BUILD_CREATED=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \.$",
                     docker_line(lines, "build", count=2)), lines
    labels_pass = [line for line in lines if "supervisor.build_record build-args" in line]
    assert len(labels_pass) == 1 and '"${labels[@]}" .' in labels_pass[0], lines


def test_build_variables_reach_the_command(tmp_path: Path) -> None:
    token = tmp_path / "hf_token"
    line = docker_line(make_n("build", "DOCKER=/usr/bin/docker", "REGISTRY=ghcr.io/acme", "IMAGE=worker",
                              "TAG=v1", "BASE_IMAGE=local/bookworm:base", "COMFYUI_REF=v0.3.64",
                              f"HF_TOKEN_FILE={token}", "CIVITAI_TOKEN_FILE=/run/civitai",
                              "BUILD_ARGS=--build-arg TORCH_PACKAGES=", "BUILD_FLAGS=--network host", *STAMP_VARS),
                       "build", count=2)
    assert line == ("DOCKER_BUILDKIT=1 /usr/bin/docker build --progress=auto -f ./build/model-layers/Dockerfile "
                    "-t ghcr.io/acme/worker:v1 --build-arg BASE_IMAGE=local/bookworm:base "
                    f"--build-arg COMFYUI_REF=v0.3.64 --secret id=HF_TOKEN,src={token} "
                    f"--secret id=CIVITAI_TOKEN,src=/run/civitai --build-arg TORCH_PACKAGES= --network host {STAMP} .")


def test_a_stage_target_or_labels_no_builds_once() -> None:
    for args in (("BUILD_FLAGS=--target comfyui-git",), ("LABELS=no",)):
        lines = make_n("build", *args)
        docker_line(lines, "build", count=1)
        assert any(line.startswith('echo ">> no labels (LABELS=no)"') for line in lines), lines


def test_a_missing_secret_file_stops_the_build_before_docker_runs(tmp_path: Path) -> None:
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "build", "DOCKER=false",
                           f"HF_TOKEN_FILE={tmp_path / 'missing'}"], text=True, capture_output=True, timeout=30, env=ENV)
    assert proc.returncode != 0
    assert f"build: the secret file {tmp_path / 'missing'} cannot be read" in proc.stderr


def test_push_needs_a_registry_and_pushes_the_built_reference() -> None:
    lines = make_n("push", "REGISTRY=docker.io/acme", "TAG=v2")
    line = docker_line(lines, "push")
    assert line.startswith("docker push docker.io/acme/comfyui-worker:v2 | tee "), line
    # then the layers it pushed, with their sizes (scripts/push_report.py)
    assert any("scripts/push_report.py" in ln and "--image docker.io/acme/comfyui-worker:v2" in ln for ln in lines)
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "push"], text=True,
                          capture_output=True, timeout=30, env=ENV)
    assert proc.returncode != 0 and "REGISTRY is not set" in proc.stderr


def test_run_uses_gpus_ports_an_env_file_and_a_data_volume() -> None:
    line = docker_line(make_n("run"), "run")
    assert line == ("docker run --rm --name comfyui-worker --gpus all -p 127.0.0.1:8000:8000 --env-file .env "
                    "-v comfyui-worker-data:/data comfyui-worker:latest")
    line = docker_line(make_n("run", "GPUS=", "PORT=9000", "HOST_ADDR=0.0.0.0", "ENV_FILE=w.env",
                              "DATA_VOLUME=/srv/worker"), "run")
    assert "--gpus" not in line and "-p 0.0.0.0:9000:8000 --env-file w.env -v /srv/worker:/data" in line


def test_every_image_target_says_what_it_does() -> None:
    for target in ("build", "push REGISTRY=r", "run", "test-image", "test-real-image"):
        lines = make_n(*target.split())
        assert any(line.startswith("echo \">> ") for line in lines), (target, lines)


def test_the_dockerfile_keeps_to_the_builtin_frontend_and_its_contract() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M), "a # syntax= line needs a frontend from a registry"
    assert "<<" not in text, "heredoc RUN needs a newer frontend"
    # CUDA's base flavour: torch's wheels bring CUDA's libraries (docs/image.md, "CUDA once")
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S*-base-", text, re.M)
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^USER worker$", text, re.M)
    assert re.search(r'^ENTRYPOINT \[.*"-m", "supervisor"\]$', text, re.M)
    assert re.search(r'^\s+CMD \[.*"-m", "supervisor.supervision.healthcheck"\]$', text, re.M)
    # tokens only through secret mounts, never through ARG or ENV
    assert not re.search(r"^(ARG|ENV)\s+\S*(TOKEN|KEY|SECRET)", text, re.M)
    assert "--mount=type=secret,id=HF_TOKEN" in text and "--mount=type=cache" in text
    # the worker's code is the last layer-making instruction
    layer_making = [line.split()[0] for line in text.splitlines() if re.match(r"^(RUN|COPY|ADD)\b", line)]
    last = [line for line in text.splitlines() if re.match(r"^(RUN|COPY|ADD)\b", line)][-1]
    assert layer_making and last == "COPY supervisor/ /opt/worker/supervisor/"
