"""The documented CPU image: `make build-cpu` builds it (no CUDA base, no torch, the stand-in as ComfyUI, on a base
made without a registry), `make run-cpu` runs it, and it answers the README's quick start (`/runsync`) unchanged.

Everything as a user runs it: the two make targets with only a unique tag, port and container name added, and
the README's curl block verbatim (its address and output folder replaced, like tests/test_readme_quickstart.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers.make_dev import wait_for_ready
from tests.helpers.readme import run_quickstart
from tests.helpers.standin import free_port
from tests.image.imagekit import ROOT, ImageUnderTest, run_build, wait_for

BUILD_TIMEOUT_S = 1200
CPU_IMAGE = "comfyui-worker-cpu"
IDENTITY = "[standin] this is the stand-in ComfyUI (tests/standin), not ComfyUI"

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 300)


def make_env() -> dict[str, str]:
    """The user's environment: no make variables of the test's own (DOCKER included: `make build` finds one)."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "DOCKER", "TAG", "CPU_PORT",
                                                             "CPU_CONTAINER", "CPU_BASE_IMAGE", "CPU_IMAGE")}


@pytest.fixture(scope="module")
def cpu_image(engine: Any, base_image: str, tmp_path_factory: pytest.TempPathFactory,
              report: Callable[[str], None]) -> Iterator[ImageUnderTest]:
    """`make build-cpu` with a unique tag; the base it names by default is the one base_image made."""
    work = tmp_path_factory.mktemp("cpu-image")
    tag = f"t{uuid.uuid4().hex[:10]}"
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "build-cpu", f"TAG={tag}", "PROGRESS=plain"]
    report(f"building {CPU_IMAGE}:{tag} with `make build-cpu` (log: {work / 'build.log'})")
    build = run_build(cmd, work / "build.log", report, BUILD_TIMEOUT_S)
    if not build.ok:
        pytest.fail(f"`make build-cpu` failed (exit {build.returncode}, {build.seconds:.0f} s); last lines:\n"
                    f"{build.tail()}", pytrace=False)
    report(f"built {CPU_IMAGE}:{tag} in {build.seconds:.1f} s")
    yield ImageUnderTest(ref=f"{CPU_IMAGE}:{tag}", context=ROOT, build=build, make_cmd=cmd, token_file=Path(),
                         workdir=work)
    try:
        engine.images.remove(f"{CPU_IMAGE}:{tag}", noprune=False)
    except Exception:  # noqa: BLE001 - already gone, or still used by a container being removed
        pass


def run_in(engine: Any, ref: str, *argv: str) -> str:
    """A command in a throwaway container of the image (its entrypoint bypassed), its output."""
    out = engine.containers.run(ref, list(argv[1:]), entrypoint=argv[0], remove=True, stdout=True, stderr=True)
    return out.decode()


def test_the_cpu_image_has_no_cuda_no_torch_and_the_stand_in_as_comfyui(engine: Any, base_image: str,
                                                                         cpu_image: ImageUnderTest) -> None:
    assert f"from docker/Dockerfile on {base_image} with " in cpu_image.build.log  # the default base, client found
    env = engine.images.get(cpu_image.ref).attrs["Config"]["Env"]
    assert not [e for e in env if e.startswith(("NVIDIA_", "CUDA_", "NV_"))], env
    probe = ("import importlib.util as u, pathlib; "
             "print(sorted(m for m in ('torch', 'torchvision', 'aiohttp') if u.find_spec(m))); "
             "print('stand-in' in pathlib.Path('/opt/ComfyUI/main.py').read_text())")
    assert run_in(engine, cpu_image.ref, "/opt/venv/comfyui/bin/python", "-c", probe).split() == ["['aiohttp']", "True"]
    assert run_in(engine, cpu_image.ref, "sh", "-c", "ls /usr/local/ | grep -c cuda || true").strip() == "0"


def test_make_run_cpu_serves_the_readmes_quick_start(cpu_image: ImageUnderTest, tmp_path: Path,
                                                     engine: Any) -> None:
    port, name = free_port(), f"cputest-{uuid.uuid4().hex[:8]}"
    tag = cpu_image.ref.split(":", 1)[1]
    log_path = tmp_path / "run-cpu.log"
    with log_path.open("wb") as log:
        run = subprocess.Popen(["make", "--no-print-directory", "-C", str(ROOT), "run-cpu", f"TAG={tag}",
                                f"CPU_PORT={port}", f"CPU_CONTAINER={name}"], env=make_env(), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_ready(run, f"http://127.0.0.1:{port}", log_path, 120, "`make run-cpu`")
        out = tmp_path / "quickstart"
        quick = run_quickstart(f"http://127.0.0.1:{port}", out)
        assert quick.returncode == 0, quick.stdout + quick.stderr
        with Image.open(out / "example_00001_.png") as img:
            assert img.format == "PNG" and img.size == (512, 512)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C, as the target says
        run.wait(60)
        wait_for(lambda: not engine.containers.list(all=True, filters={"name": name}), 30,
                 f"the container {name} to be gone (--rm)")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
        try:
            engine.containers.get(name).remove(force=True)
        except Exception:  # noqa: BLE001 - gone already (--rm)
            pass
    text = log_path.read_text()
    docker_run = next(line for line in text.splitlines() if " run --rm " in line)
    assert "--gpus" not in docker_run and f"-p 127.0.0.1:{port}:8000" in docker_run, docker_run
    assert f"[comfyui] {IDENTITY}" in text, text[-3000:]
    assert "API listening on http://0.0.0.0:8000 (auth: none" in text, text[-3000:]
    assert "Stopped server" in text, "Ctrl-C stops the worker, which stops ComfyUI cleanly"
