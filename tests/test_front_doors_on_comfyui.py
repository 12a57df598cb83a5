"""Both front doors on both ComfyUIs: the tiny SDXL and IPAdapter workflows through ``/runsync`` of the
self-hosted API and through the unmodified RunPod SDK worker loop, with a warm-up workflow run before ready.

On the stand-in (``make test``) the graphs run on its dummy model files; on the real ComfyUI 0.3.64
(``make test-real``) they load the seeded tiny models of tests/helpers/tiny_models.py and sample for real, so
the pictures are real, deterministic, and the IPAdapter one differs from the plain one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers.api import Api, api_worker, png_of
from tests.helpers.comfy_targets import ComfyTarget
from tests.helpers.real_comfyui import workflow
from tests.test_runpod_worker import runpod_worker

pytestmark = pytest.mark.timeout(600)

WORKFLOWS = ("sdxl_plain", "sdxl_ipadapter_advanced")


def picture_digest(b64_png: str) -> str:
    """The decoded 64x64 picture's pixels, hashed: what two runs of the same graph must share."""
    img = png_of(b64_png)
    assert img.size == (64, 64), img.size
    assert len(img.convert("RGB").getcolors(64 * 64) or []) > 16, "a black or flat picture"
    return hashlib.sha256(img.convert("RGB").tobytes()).hexdigest()


def warmup_file(tmp_path: Path) -> Path:
    """A warm-up that loads the checkpoint and samples one step, so the first job finds the model in memory."""
    path = tmp_path / "warmup.json"
    path.write_text(json.dumps(workflow(steps=1, prefix="warmup")))
    return path


def test_self_hosted_runsync_gives_the_sdxl_and_ipadapter_pictures(tmp_path: Path, comfy: ComfyTarget) -> None:
    comfy.add_models(tmp_path / "models")
    with api_worker(tmp_path, ready_timeout=comfy.start_timeout_s + 60, WARMUP_WORKFLOW=str(warmup_file(tmp_path)),
                    **comfy.env) as w:
        digests = {}
        for name in WORKFLOWS:
            body = w.api.ok("POST", "/runsync?wait=300000", {"input": {"workflow": workflow(name)}}, timeout=330)
            assert body["status"] == "COMPLETED", body
            images = body["output"]["images"]
            assert [i["filename"] for i in images] == [f"tiny_{name}_00001_.png"], images
            digests[name] = picture_digest(images[0]["data"])
        assert digests["sdxl_plain"] != digests["sdxl_ipadapter_advanced"]
        again = w.api.ok("POST", "/runsync?wait=300000", {"input": {"workflow": workflow(prefix="again")}},
                         timeout=330)
        assert picture_digest(again["output"]["images"][0]["data"]) == digests["sdxl_plain"]
        health = w.api.ok("GET", "/health", timeout=5)
        assert health["comfyui"]["state"] == "ready", health  # the warm-up passed: not degraded
        assert warmup_ran(w.env["COMFYUI_PORT"]), "ComfyUI's history holds no finished warm-up prompt"


def warmup_ran(comfyui_port: str) -> bool:
    """ComfyUI's own history (asked directly) holds the warm-up prompt, finished with success."""
    history = Api(f"http://127.0.0.1:{comfyui_port}").ok("GET", "/history", timeout=10)
    return any(entry["status"]["status_str"] == "success" and '"warmup"' in json.dumps(entry["prompt"])
               for entry in history.values())


def test_runpod_loop_gives_the_sdxl_and_ipadapter_pictures(tmp_path: Path, comfy: ComfyTarget) -> None:
    comfy.add_models(tmp_path / "models")
    with runpod_worker(tmp_path, models={}, **comfy.env) as (rp, worker):
        jobs = {name: rp.enqueue({"workflow": workflow(name)}) for name in WORKFLOWS}
        digests = {}
        for name, job in jobs.items():
            result = rp.wait_result(job, timeout=comfy.start_timeout_s + 300)
            assert set(result) == {"output"}, result
            images = result["output"]["images"]
            assert [i["filename"] for i in images] == [f"tiny_{name}_00001_.png"], images
            digests[name] = picture_digest(images[0]["data"])
        assert digests["sdxl_plain"] != digests["sdxl_ipadapter_advanced"]
        steps = [p for p in rp.progress(jobs["sdxl_plain"]) if p.get("step") is not None]
        assert steps and steps[-1]["node_type"] == "KSampler", rp.progress(jobs["sdxl_plain"])
    assert "RunPod worker loop starting" in worker.log_text()
