"""Seed 000's client, unchanged, against the self-hosted API (``RUNSYNC_ENVELOPE=output``, ``RESPONSE_FORMAT=results``).

Seed 000 documents a Python client that posts to ``/runsync`` and reads ``result["status"] == "completed"`` and
``result["results"]`` at the top of the response. Its two ```` ```python ```` blocks are taken from the seed's text
(tests/fixtures/seeds/source/) and executed as they are, with only what its reader is told to fill in: the
endpoint (this worker's host instead of ``https://api.runpod.ai``) and the key; for the success and timeout
cases the seed's example workflow (a one-node fragment) is replaced by the seed's full workflow (the request
fixture, tests/fixtures/seeds/000_request.json). Its own code reads ``image.jpg`` and builds the ``images``
entry; its own reading code saves the image.
"""

from __future__ import annotations

import ast
import base64
import copy
import io
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers.api import ROOT, api_worker, assert_shape, seed, seed_models, write_models

pytestmark = pytest.mark.timeout(120)

KEY = "seed-000-key"
SOURCE = next((ROOT / "tests" / "fixtures" / "seeds" / "source").glob("000_*.txt"))
REQUEST = seed("000_request.json")
RUNPOD_HOST = "https://api.runpod.ai"


def client_blocks() -> tuple[str, str]:
    """The seed's Python request block and its Python result-reading block, as written."""
    blocks = re.findall(r"^```python\n(.*?)^```$", SOURCE.read_text(encoding="utf-8"), re.S | re.M)
    request = next(b for b in blocks if "requests.post(ENDPOINT_URL" in b)
    reading = next(b for b in blocks if 'result["status"] == "completed"' in b)
    return request, reading


def with_workflow(code: str) -> str:
    """The request block with its example workflow literal replaced by the name ``WORKFLOW`` (nothing else)."""
    tree = ast.parse(code)
    payload = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "payload")
    inner = payload.value.values[[k.value for k in payload.value.keys].index("input")]  # type: ignore[attr-defined]
    inner.values[[k.value for k in inner.keys].index("workflow")] = ast.Name("WORKFLOW", ast.Load())
    return ast.unparse(tree)


def run_client(base: str, workdir: Path, workflow: dict[str, Any] | None, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Seed 000's client in ``workdir`` against ``base``; its ``result``."""
    request, reading = client_blocks()
    assert RUNPOD_HOST in request and "YOUR_API_KEY" in request
    request = request.replace(RUNPOD_HOST, base).replace("YOUR_API_KEY", KEY)
    if workflow is not None:
        request = with_workflow(request)
    workdir.mkdir()
    image = REQUEST["input"]["images"][0]["image"].split(",", 1)[1]
    (workdir / "image.jpg").write_bytes(base64.b64decode(image))
    monkeypatch.chdir(workdir)
    scope: dict[str, Any] = {"__name__": "seed_000_client", "WORKFLOW": workflow}
    exec(compile(request, "seed-000-request", "exec"), scope)  # noqa: S102 - the seed's documented client
    exec(compile(reading, "seed-000-reading", "exec"), scope)  # noqa: S102
    return scope["result"]


def saved_files(workdir: Path) -> list[str]:
    return sorted(p.name for p in workdir.iterdir() if p.name != "image.jpg")


def test_seed_000_client_unchanged_gets_its_documented_bodies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_models(tmp_path / "models", seed_models("000_request.json"))
    with api_worker(tmp_path, API_KEY=KEY, RESPONSE_FORMAT="results", RUNSYNC_ENVELOPE="output",
                    JOB_TIMEOUT_S="2", STANDIN_STEP_DELAY_S="0.01") as w:
        base = w.api.base

        # success: {"status": "completed", "results": [...]} as the whole body; the client saves the image
        workdir = tmp_path / "success"
        result = run_client(base, workdir, REQUEST["input"]["workflow"], monkeypatch)
        assert_shape(result, seed("000_response_success.json"))
        assert result["status"] == "completed" and saved_files(workdir) == ["ComfyUI_00001_.png"]
        with Image.open(io.BytesIO((workdir / "ComfyUI_00001_.png").read_bytes())) as img:
            assert img.format == "PNG"

        # error: the seed's own example payload, verbatim (LoadImage alone: ComfyUI has no output to run)
        workdir = tmp_path / "error"
        result = run_client(base, workdir, None, monkeypatch)
        assert_shape(result, seed("000_response_error.json"))
        assert result["status"] == "error" and "the workflow has no output node" in result["message"], result
        assert saved_files(workdir) == []

        # timeout: the job's deadline (JOB_TIMEOUT_S=2) passes while 1000 steps run
        slow = copy.deepcopy(REQUEST["input"]["workflow"])
        slow["3"]["inputs"]["steps"] = 1000
        workdir = tmp_path / "timeout"
        result = run_client(base, workdir, slow, monkeypatch)
        assert_shape(result, seed("000_response_timeout.json"))
        assert result["status"] == "timeout" and result["message"].startswith("Job timed out after 2 s"), result
        assert saved_files(workdir) == []

        # a job not finished within the wait keeps RunPod's envelope, so it can be polled
        status, body = w.api.post("/runsync?wait=0", REQUEST)
        assert status == 200 and set(body) == {"id", "status"} and body["status"] in ("IN_QUEUE", "IN_PROGRESS")
        done = w.api.wait_status(body["id"], ("COMPLETED",))
        assert done["output"]["status"] == "completed"
        # the per-request override back to RunPod's envelope
        enveloped = w.api.ok("POST", "/runsync?envelope=runpod", REQUEST)
        assert enveloped["status"] == "COMPLETED" and enveloped["output"]["results"][0]["filename"]


def test_the_envelope_per_request_on_a_default_worker(tmp_path: Path) -> None:
    write_models(tmp_path / "models", seed_models("000_request.json"))
    with api_worker(tmp_path, API_KEY=KEY, RESPONSE_FORMAT="results", STANDIN_STEP_DELAY_S="0.01") as w:
        default = w.api.ok("POST", "/runsync", REQUEST)
        assert default["status"] == "COMPLETED" and default["output"]["status"] == "completed"  # RunPod's, as before
        unwrapped = w.api.ok("POST", "/runsync?envelope=output", REQUEST)
        assert_shape(unwrapped, seed("000_response_success.json"))
        # another format's failure, unwrapped: what a RunPod handler returns, {"error": message}, with 200
        bad = copy.deepcopy(REQUEST)
        bad["input"]["response_format"] = "worker-comfyui"
        bad["input"]["workflow"]["2"]["inputs"]["unet_name"] = "not-installed.safetensors"
        status, body = w.api.post("/runsync?envelope=output", bad)
        assert status == 200 and set(body) == {"error"} and body["error"].startswith("Workflow validation failed")
        status, body = w.api.post("/runsync?envelope=naked", REQUEST)
        assert status == 400 and body == {"error": "'envelope' must be one of runpod, output, not 'naked'"}
