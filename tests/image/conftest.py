"""Session fixtures of the image test: engine, base image, hub server with a token, git node pack, the build.

Everything expensive happens once per session: one test build (a few minutes from a cold engine, seconds
when BuildKit's cache is warm), one long-running worker container shared by the checks that need it.
Without an engine the tests skip with the way to get one -- except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hubserver.harness import HubServer, payload, sha256_of
from tests.image.imagekit import (
    BASE_TAG,
    DOCKER_CLI,
    IMAGE,
    PACK_CLASS,
    ROOT,
    GitPackServer,
    Hub,
    ImageUnderTest,
    Worker,
    make_build_args,
    remove_images,
    run_build,
    running_worker,
    stage_context,
    unavailable,
)

BUILD_TIMEOUT_S = 1200
PRIVATE_REPO = "acme/private-models"
PUBLIC_REPO = "acme/public-models"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_image: the image built with the real ComfyUI, its node packs and torch "
                                       "(GBs; only run when asked for: `make test-real-image`, -m real_image)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The real image test (3.5-8 min and ~3 GB of torch on a new machine) does not fit CI's budget: it runs only when
    the marker expression names it (`make test-real-image`), never as part of `make test` (docs/image.md)."""
    if "real_image" in (config.option.markexpr or ""):
        return
    real = [item for item in items if item.get_closest_marker("real_image")]
    if real:
        items[:] = [item for item in items if not item.get_closest_marker("real_image")]
        config.hook.pytest_deselected(items=real)


@pytest.fixture(scope="session")
def report(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Write a progress line to the terminal now, past pytest's output capture (builds take minutes)."""
    terminal = pytestconfig.pluginmanager.getplugin("terminalreporter")
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:
        if terminal is None or capture is None:
            return
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"  [image] {line}")

    return say


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    if not Path(DOCKER_CLI).exists():
        unavailable(f"no Docker engine: no {DOCKER_CLI} (the engine's own client, whose BuildKit handles RUN --mount)")
    import docker

    try:
        client = docker.from_env(timeout=600)
        client.version()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the engine means the same here
        unavailable(f"no Docker engine answers ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(engine: Any, report: Callable[[str], None]) -> str:
    """The debootstrap base, made once and cached in the engine (docker/ci/base-image.sh)."""
    report(f"base image {BASE_TAG} (made with debootstrap when missing, ~40 s)")
    proc = subprocess.run(["bash", str(ROOT / "docker/ci/base-image.sh")], text=True, capture_output=True,
                          env={**os.environ, "DOCKER": DOCKER_CLI, "BASE_TAG": BASE_TAG}, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"the base image {BASE_TAG} could not be made\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}",
                    pytrace=False)
    report(proc.stdout.strip().splitlines()[-1])
    return BASE_TAG


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """The manifest issue's hub server on 127.0.0.1, with a private repository that needs a random token."""
    token = secrets.token_urlsafe(32)
    server = HubServer(tmp_path_factory.mktemp("hub"), token=token, private=(PRIVATE_REPO,))
    # Fresh content every session: BuildKit's download cache (content-addressed) cannot serve it, so the build
    # really downloads it, with the token.
    seed = secrets.randbits(48)
    ckpt, lora, onnx = (payload(96 * 1024, seed=seed), payload(3 * 1024, seed=seed + 1),
                        payload(2 * 1024, seed=seed + 2))
    server.add_hf(PRIVATE_REPO, "image-test.safetensors", ckpt)
    server.add_hf(PUBLIC_REPO, "loras/image-test-lora.safetensors", lora)
    server.add_hf(PUBLIC_REPO, "buffalo_l/det_10g.onnx", onnx)
    with server:
        yield Hub(server=server, token=token,
                  files={"checkpoints/image-test.safetensors": (sha256_of(ckpt), ckpt),
                         "loras/image-test-lora.safetensors": (sha256_of(lora), lora),
                         # InsightFace's models, where IPAdapter_plus points insightface: <models>/insightface
                         "insightface/models/buffalo_l/det_10g.onnx": (sha256_of(onnx), onnx)},
                  private_path=f"/{PRIVATE_REPO}/resolve/main/image-test.safetensors")


@pytest.fixture(scope="session")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitPackServer]:
    server = GitPackServer(tmp_path_factory.mktemp("gitpack")).start()
    yield server
    server.stop()


def models_yaml(hub: Hub) -> str:
    lora_sha = hub.files["loras/image-test-lora.safetensors"][0]
    return f"""# models.yaml of the image test: served by the loopback hub server (HF_ENDPOINT build arg)
version: 1
models:
  - name: image-test-checkpoint
    folder: checkpoints
    filename: image-test.safetensors
    hf: {{repo: {PRIVATE_REPO}, file: image-test.safetensors, revision: main}}
    secret: HF_TOKEN
  - name: image-test-lora
    folder: loras
    filename: image-test-lora.safetensors
    hf: {{repo: {PUBLIC_REPO}, file: loras/image-test-lora.safetensors, revision: main}}
    sha256: "{lora_sha}"
  - name: image-test-insightface-detector
    folder: insightface
    filename: models/buffalo_l/det_10g.onnx
    hf: {{repo: {PUBLIC_REPO}, file: buffalo_l/det_10g.onnx, revision: main}}
"""


@pytest.fixture(scope="session")
def image(engine: Any, base_image: str, hub: Hub, pack: GitPackServer, tmp_path_factory: pytest.TempPathFactory,
          report: Callable[[str], None]) -> Iterator[ImageUnderTest]:
    """The test variant of docker/Dockerfile, built with `make build` (BuildKit, --network host)."""
    work = tmp_path_factory.mktemp("image")
    context = stage_context(work / "context", models_yaml(hub), f"{pack.url}@{pack.commit}\n")
    token_file = work / "hf_token"
    token_file.write_text(hub.token)
    token_file.chmod(0o600)
    tag = f"t{uuid.uuid4().hex[:10]}"
    cmd = make_build_args(context, tag, hub.server.endpoint, token_file)
    report(f"building {IMAGE}:{tag} (log: {work / 'build.log'})")
    build = run_build(cmd, work / "build.log", report, BUILD_TIMEOUT_S)
    if not build.ok:
        pytest.fail(f"the test image did not build (exit {build.returncode}, {build.seconds:.0f} s); "
                    f"last lines of {work / 'build.log'}:\n{build.tail()}", pytrace=False)
    report(f"built {IMAGE}:{tag} in {build.seconds:.1f} s")
    under_test = ImageUnderTest(ref=f"{IMAGE}:{tag}", context=context, build=build, make_cmd=cmd,
                                token_file=token_file, workdir=work)
    yield under_test
    remove_images(engine, under_test.ref, f"{IMAGE}:{tag}-rebuild")


@pytest.fixture(scope="session")
def worker(engine: Any, image: ImageUnderTest, report: Callable[[str], None]) -> Iterator[Worker]:
    """The image running as users run it self-hosted (API on port 8000, API_KEY set), on the stand-in."""
    with running_worker(engine, image.ref, "imagetest-worker", {"REQUIRED_NODES": PACK_CLASS}, report) as running:
        yield running
