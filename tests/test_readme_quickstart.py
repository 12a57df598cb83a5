"""The quick start works as written: ``make dev``, then the documented curl sequence returns an image.

The sequence is the ```` ```bash readme-quickstart ```` block of docs/api.md, and of README.md when the README
carries it (then both must be the same text). It runs verbatim under ``bash -euo pipefail``, except that the
port 8000 is replaced by a free one, against ``make dev`` itself (``-o .venv/.installed``: the test never
reinstalls the virtual environment). ``.ci/run`` runs the README's block the same way on a fresh clone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.worker import ROOT, free_port, tree_processes, wait_for, worker_env

pytestmark = pytest.mark.timeout(120)

BLOCK = re.compile(r"^```bash readme-quickstart\n(.*?)^```$", re.S | re.M)


def quickstart(path: Path) -> str | None:
    match = BLOCK.search(path.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def test_the_readme_and_api_doc_show_the_same_sequence() -> None:
    documented = quickstart(ROOT / "docs" / "api.md")
    assert documented and "make dev" not in documented and "/runsync" in documented
    readme = quickstart(ROOT / "README.md")
    if readme is None:
        pytest.skip("README.md does not carry the ```bash readme-quickstart block yet (docs/api.md does)")
    assert readme == documented


def test_make_dev_then_the_documented_curl_returns_an_image(tmp_path: Path) -> None:
    script = quickstart(ROOT / "README.md") or quickstart(ROOT / "docs" / "api.md")
    assert script
    api_port, comfy_port = free_port(), free_port()
    env = worker_env(tmp_path, API_PORT=str(api_port), COMFYUI_PORT=str(comfy_port))
    for key in ("COMFYUI_DIR", "COMFYUI_ARGS", "DATA_DIR", "MODELS_DIR", "STATE_FILE", "WORKFLOWS_DIR",
                "VOLUME_MODELS_DIR", "WORKER_MODE"):
        env.pop(key, None)  # exactly what `make dev` sets, nothing of the test's own
    log = open(tmp_path / "make-dev.log", "wb")
    dev = subprocess.Popen(["make", "-o", ".venv/.installed", "dev"], cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy() -> bool:
            assert dev.poll() is None, (tmp_path / "make-dev.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(healthy, 60, interval=0.1, what="make dev to be ready (/ready)")
        work = tmp_path / "client"
        work.mkdir()
        (work / "examples").symlink_to(ROOT / "examples")
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace("127.0.0.1:8000", f"127.0.0.1:{api_port}")],
                             cwd=work, capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "STANDIN_"))})
        assert run.returncode == 0, run.stdout + run.stderr
        saved = work / "example_00001_.png"
        assert f"{saved.name} (" in run.stdout, run.stdout
        with Image.open(saved) as img:
            assert img.format == "PNG" and img.size == (512, 512)
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGTERM)
        try:
            dev.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait(10)
        log.close()
        deadline = time.monotonic() + 5
        while tree_processes(env["TEST_TREE_ID"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = tree_processes(env["TEST_TREE_ID"])
        for proc in leftovers:
            proc.kill()
        assert not leftovers, leftovers
    assert "API listening on http://127.0.0.1:" in (tmp_path / "make-dev.log").read_text()
