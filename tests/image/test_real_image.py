"""The image with the real parts, built and run on the CPU: ComfyUI 0.3.64, IPAdapter_plus, torch, real models.

One build through `make build` (realkit.py says what differs from the stand-in variant), one container run
with ``COMFYUI_ARGS=--cpu``. The checks:

* the build installed the pinned torch triple from pip's default index (TORCH_INDEX_URL empty), the upstream
  ComfyUI, every pack of custom_nodes.txt at its pinned commit (cloned by the node installer from a git daemon
  on loopback), and the generated models from the loopback hub, byte for byte; the node installer's import
  check ran on the real ComfyUI;
* the container becomes healthy and ``ready`` (IPAdapterAdvanced registered);
* ``/runsync`` of the checkpoint workflow and of the IPAdapter workflow each return a real 64x64 image (not one
  flat colour); the checkpoint job a second time (its first files cleaned up) gives the same pixels, the
  IPAdapter one other pixels.

Not part of `make test` or CI (3.5 to 8 minutes and 3 GB of torch on a new machine: over CI's budget; the image
tier's conftest deselects it unless ``-m`` names ``real_image``): `make test-real-image` runs it, after
`make real-comfyui` (the models' generator needs its torch). docs/image.md has its time and size.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers.real_comfyui import workflow
from tests.hubserver.harness import HubServer, sha256_of
from tests.image.imagekit import (
    IMAGE,
    GitDaemon,
    ImageUnderTest,
    Worker,
    dump,
    health,
    images_in,
    make_build_args,
    post_json,
    remove_images,
    run_build,
    running_worker,
    shell,
    stage_context,
    unavailable,
    wait_for,
)
from tests.image.realkit import (
    COMFYUI_IN_CONTEXT,
    REAL_VARIANT,
    TORCH_PACKAGES,
    Upstream,
    generated_models,
    read_upstream,
    serve_models,
    serve_packs,
    unpack_comfyui,
)

pytestmark = [pytest.mark.real_image, pytest.mark.timeout(3600)]  # the build happens in the first set-up

BUILD_TIMEOUT_S = 3000
READY_TIMEOUT_S = 300
JOB_TIMEOUT_S = 300
REAL_CORE_NODE_CLASSES = 400  # ComfyUI 0.3.64 registers 515 on the CPU; the stand-in far fewer
HOW = "the real image test reads ../shared/upstream/ and needs `make real-comfyui` (docs/image.md)"


@pytest.fixture(scope="module")
def upstream() -> Upstream:
    found, why = read_upstream()
    if found is None:
        unavailable(why, HOW)
    return found


@pytest.fixture(scope="module")
def real_models(upstream: Upstream) -> dict[str, bytes]:
    models, why = generated_models()
    if models is None:
        unavailable(why, HOW)
    return models


@pytest.fixture(scope="module")
def real_hub(real_models: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with HubServer(tmp_path_factory.mktemp("real-hub")) as server:
        yield server


@pytest.fixture(scope="module")
def packs_git(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitDaemon]:
    daemon = GitDaemon(tmp_path_factory.mktemp("real-git")).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def real_image(engine: Any, base_image: str, upstream: Upstream, real_hub: HubServer, real_models: dict[str, bytes],
               packs_git: GitDaemon, tmp_path_factory: pytest.TempPathFactory,
               report: Callable[[str], None]) -> Iterator[ImageUnderTest]:
    work = tmp_path_factory.mktemp("real-image")
    source = unpack_comfyui(upstream, work / "unpacked")
    context = stage_context(work / "context", serve_models(real_hub, real_models), serve_packs(upstream, packs_git),
                            extra_trees={COMFYUI_IN_CONTEXT: source})
    shutil.rmtree(work / "unpacked")
    tag = f"real{uuid.uuid4().hex[:10]}"
    cmd = make_build_args(context, tag, real_hub.endpoint, None, variant=REAL_VARIANT)
    report(f"building {IMAGE}:{tag}: the real ComfyUI and packs, {TORCH_PACKAGES} "
           f"(cold: ~3 GB of torch; log: {work / 'build.log'})")
    build = run_build(cmd, work / "build.log", report, BUILD_TIMEOUT_S)
    if not build.ok:
        pytest.fail(f"the real image did not build (exit {build.returncode}, {build.seconds:.0f} s); "
                    f"last lines of {work / 'build.log'}:\n{build.tail()}", pytrace=False)
    size = engine.images.get(f"{IMAGE}:{tag}").attrs["Size"]
    report(f"built {IMAGE}:{tag} in {build.seconds:.1f} s, {size / 1e9:.2f} GB")
    yield ImageUnderTest(ref=f"{IMAGE}:{tag}", context=context, build=build, make_cmd=cmd, token_file=Path(),
                         workdir=work)
    remove_images(engine, f"{IMAGE}:{tag}")


@pytest.fixture(scope="module")
def real_worker(engine: Any, real_image: ImageUnderTest, report: Callable[[str], None]) -> Iterator[Worker]:
    """The real image run as users run it self-hosted, ComfyUI on the CPU."""
    with running_worker(engine, real_image.ref, "imagetest-real", {"REQUIRED_NODES": "IPAdapterAdvanced"},
                        report) as running:
        yield running


# ------------------------------------------------------------------------------------------------ the build


def test_real_build_has_the_pinned_torch_comfyui_and_packs(engine: Any, real_image: ImageUnderTest,
                                                          upstream: Upstream) -> None:
    heads = "; ".join(f"git -c safe.directory='*' -C /opt/ComfyUI/custom_nodes/{name} rev-parse HEAD"
                      for name in upstream.pins)
    out = shell(engine, real_image.ref,
                "/opt/venv/comfyui/bin/python -c 'from importlib.metadata import version; import torch; "
                "print(*(version(p) for p in (\"torch\", \"torchvision\", \"torchaudio\")))'; "
                f"grep -h '^__version__' /opt/ComfyUI/comfyui_version.py; {heads}")
    versions, comfyui, *commits = out.strip().splitlines()[-2 - len(upstream.pins):]
    # torch imports; its distributions are PyPI's (the PyTorch index's carry a local label: 2.9.1+cu128)
    assert versions.split() == [pin.split("==")[1] for pin in TORCH_PACKAGES.split()], out
    assert comfyui == '__version__ = "0.3.64"', out
    assert commits == list(upstream.pins.values()), out
    # The node step runs in every session (the git daemon's port, in custom_nodes.txt, is new each time): its
    # import check started the real ComfyUI, which loaded every pack and registered its node classes.
    log = real_image.build.log
    assert "install_nodes: import check: starting ComfyUI (/object_info)" in log, log[-3000:]
    # The server that answered the check is the real one: its /system_stats gives ComfyUI 0.3.64 with the pinned
    # torch (the stand-in claims another torch), and /object_info lists ComfyUI's ~500 core node classes.
    answered = re.search(r"install_nodes: import check: answered by ComfyUI (\S+), torch (\S+), (\d+) node classes",
                         log)
    assert answered, log[-3000:]
    torch_pin = TORCH_PACKAGES.split()[0].split("==")[1]
    assert answered[1] == "0.3.64" and answered[2].split("+")[0] == torch_pin, answered[0]
    assert int(answered[3]) >= REAL_CORE_NODE_CLASSES, answered[0]
    for name in upstream.pins:
        assert re.search(rf"install_nodes: imports: .*\b{re.escape(name)} \([1-9]\d* node classes\)", log), log[-3000:]


def test_real_build_ends_with_a_clean_pip_check(engine: Any, real_image: ImageUnderTest,
                                               report: Callable[[str], None]) -> None:
    """The build's last step in ComfyUI's venv is `pip check` (the build fails otherwise); with the default pins the
    venv is consistent. Also what the torch wheels weigh installed (docs/image.md, "CUDA once")."""
    log = real_image.build.log
    at = log.find(">> pip check of ComfyUI's venv")
    assert at >= 0 and "No broken requirements found." in log[at:], log[at - 2000 if at > 0 else -3000:]
    out = shell(engine, real_image.ref, "cd /opt/venv/comfyui/lib/python3*/site-packages && "
                                        "du -sm torch torchvision torchaudio nvidia triton 2>/dev/null; "
                                        "du -sm nvidia/* 2>/dev/null | sort -rn | head -5; du -sm /opt/venv/comfyui")
    report("installed sizes (MB):\n" + out.strip())
    sizes = {line.split()[1]: int(line.split()[0]) for line in out.strip().splitlines() if len(line.split()) == 2}
    assert sizes.get("torch", 0) > 100, out  # the real torch, not a stand-in


def test_real_build_baked_the_generated_models(engine: Any, real_image: ImageUnderTest,
                                              real_models: dict[str, bytes]) -> None:
    """Fetched from the loopback hub by models.yaml entries with their sha256 (on a warm engine, the fetcher's
    content-addressed cache serves them), where ComfyUI reads them, byte for byte."""
    listing = shell(engine, real_image.ref, "cd /opt/ComfyUI/models && sha256sum " + " ".join(real_models))
    found = {line.split()[1]: line.split()[0] for line in listing.splitlines() if line.strip()}
    assert found == {dest: sha256_of(data) for dest, data in real_models.items()}, listing


# ------------------------------------------------------------------------------------------------ running


def test_real_worker_becomes_healthy_and_ready(real_worker: Worker) -> None:
    container = real_worker.container

    def healthy() -> bool:
        if container.status == "exited":
            raise AssertionError(f"the worker exited:\n{container.logs(tail=80).decode(errors='replace')}")
        return health(container).get("Status") == "healthy"

    try:
        wait_for(healthy, READY_TIMEOUT_S, "the real container's health to become healthy", interval=1)
    except AssertionError:
        raise AssertionError(f"not healthy: {dump(health(container))}\n"
                             f"{container.logs(tail=80).decode(errors='replace')}") from None
    code, out = container.exec_run(["cat", "/tmp/comfyui-worker/state.json"])
    # REQUIRED_NODES=IPAdapterAdvanced: "ready" (not "degraded") proves the real ComfyUI registered the pack
    assert code == 0 and json.loads(out)["state"] == "ready", out


def runsync_image(worker: Worker, name: str) -> Image.Image:
    """The one image a /runsync of workflow ``name`` returns, checked to be a real picture, not a flat one."""
    wait_for(lambda: health(worker.container).get("Status") == "healthy", READY_TIMEOUT_S, "a healthy worker",
             interval=1)
    # ?wait: the first job loads the models on a CPU shared with other work, past /runsync's default 90 s
    status, response = post_json(f"{worker.api_url}/runsync?wait={JOB_TIMEOUT_S * 1000}",
                                 {"input": {"workflow": workflow(name)}}, worker.api_key, timeout=JOB_TIMEOUT_S + 30)
    logs = worker.container.logs(tail=60).decode(errors="replace")
    assert status == 200, f"/runsync of {name} answered {status}: {str(response)[:2000]}\n{logs}"
    assert str(response.get("status", "")).upper() == "COMPLETED", f"{str(response)[:2000]}\n{logs}"
    images = images_in(response.get("output"))
    assert len(images) == 1, f"{len(images)} images in the {name} output: {str(response)[:2000]}"
    picture = Image.open(io.BytesIO(images[0])).convert("RGB")
    assert picture.size == (64, 64), picture.size
    spread = max(high - low for low, high in picture.getextrema())
    assert spread > 16, f"{name}: a flat image (NaN-black?), extrema {picture.getextrema()}"
    return picture


@pytest.fixture(scope="module")
def plain_picture(real_worker: Worker) -> Image.Image:
    return runsync_image(real_worker, "sdxl_plain")


def test_real_runsync_of_the_checkpoint_workflow_again_gives_the_same_image(real_worker: Worker,
                                                                             plain_picture: Image.Image) -> None:
    """A second identical job, after the worker cleaned up the first one's files, gives the same pixels."""
    again = runsync_image(real_worker, "sdxl_plain")
    assert again.tobytes() == plain_picture.tobytes(), "the same workflow and seed gave another image"


def test_real_runsync_of_the_ipadapter_workflow_gives_another_image(real_worker: Worker,
                                                                    plain_picture: Image.Image) -> None:
    picture = runsync_image(real_worker, "sdxl_ipadapter_advanced")
    assert picture.tobytes() != plain_picture.tobytes(), "IPAdapterAdvanced did not change the image"
