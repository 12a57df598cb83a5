"""The self-hosted API (WORKER_MODE=http): RunPod's endpoint contract over a real worker process.

One worker (``python -m supervisor`` on a free loopback port, the stand-in ComfyUI behind it, API_KEY set)
serves the tests of this module in turn; tests that need another configuration, a restart or a signal start
their own (tests/test_http_api_lifecycle.py). The sampler of the stand-in takes STEP_DELAY_S per step.
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.api import ROOT, ApiWorker, api_worker, assert_shape, png_of, seed, seed_models, write_models
from tests.helpers.worker import wait_for

pytestmark = pytest.mark.timeout(120)

KEY = "test-api-key-0123456789"
ENDPOINT = "ep-local"
STEP_DELAY_S = 0.05
SEED_001 = seed("001_request.json")
NAMED_MODELS = {
    "checkpoints": ["sd_xl_base_1.0.safetensors"],
    "ipadapter": ["ip-adapter-plus-face_sdxl_vit-h.safetensors"],
    "clip_vision": ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"],
}


def with_steps(body: dict[str, Any], steps: int) -> dict[str, Any]:
    out = copy.deepcopy(body)
    out["input"]["workflow"]["31"]["inputs"]["steps"] = steps
    return out


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiWorker]:
    root = tmp_path_factory.mktemp("api")
    write_models(root / "models", seed_models("001_request.json"))
    write_models(root / "models", NAMED_MODELS)
    workflows = root / "workflows"
    shutil.copytree(ROOT / "workflows", workflows)
    with api_worker(root, API_KEY=KEY, RUNPOD_ENDPOINT_ID=ENDPOINT, WORKFLOWS_DIR=str(workflows),
                    STANDIN_STEP_DELAY_S=str(STEP_DELAY_S), STANDIN_REQUEST_LOG=str(root / "comfy-requests.jsonl"),
                    PROGRESS_INTERVAL_S="0", MAX_QUEUE="3", MAX_REQUEST_BYTES="262144",
                    URL_INPUT_ALLOWLIST="127.0.0.1") as worker:
        yield worker


def comfy_requests(w: ApiWorker) -> list[dict[str, Any]]:
    path = Path(w.env["STANDIN_REQUEST_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def comfy_queue(w: ApiWorker) -> Any:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{w.env['COMFYUI_PORT']}/queue", timeout=5) as resp:
        return json.loads(resp.read())


def blocker(w: ApiWorker, steps: int = 100) -> str:
    """A job that keeps the single runner busy for steps x STEP_DELAY_S seconds, once its sampler runs."""
    job = w.api.ok("POST", "/run", with_steps(SEED_001, steps))["id"]
    wait_for(lambda: any(isinstance(c["output"], dict) and c["output"].get("step")
                         for c in w.api.ok("GET", f"/stream/{job}")["stream"]), 30, what="the sampler to run")
    return job


def test_run_then_status_goes_in_queue_in_progress_completed(w: ApiWorker) -> None:
    first = blocker(w, steps=30)
    submitted = w.api.ok("POST", "/run", with_steps(SEED_001, 20))
    assert submitted == {"id": submitted["id"], "status": "IN_QUEUE"}
    assert_shape(submitted, seed("003_response_run.json"))
    assert_shape(submitted, seed("002_response_run.json"))
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = w.api.ok("GET", f"/status/{submitted['id']}")
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        if body["status"] == "IN_PROGRESS":
            assert body == {"id": submitted["id"], "status": "IN_PROGRESS"}  # seed 003's in-progress shape
        if body["status"] not in ("IN_QUEUE", "IN_PROGRESS"):
            break
        time.sleep(0.05)
    assert seen == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"], seen
    assert body["executionTime"] >= 20 * STEP_DELAY_S * 1000, body  # at least the sampler's own time
    assert body["delayTime"] >= 0 and isinstance(body["delayTime"], int)
    assert_shape(body, seed("001_response_success.json"), optional=("$.output.errors",))
    # POST /status answers the same
    assert w.api.ok("POST", f"/status/{submitted['id']}")["status"] == "COMPLETED"
    assert w.api.ok("GET", f"/status/{first}")["status"] == "COMPLETED"


def test_runsync_answers_the_finished_job_and_v2_routes_work(w: ApiWorker) -> None:
    body = w.api.ok("POST", f"/v2/{ENDPOINT}/runsync", with_steps(SEED_001, 2))
    assert body["status"] == "COMPLETED" and body["id"].startswith("sync-")
    assert_shape(body, seed("001_response_success.json"), optional=("$.output.errors",))
    assert png_of(body["output"]["images"][0]["data"]).size == (1024, 1024)
    assert w.api.ok("GET", f"/v2/{ENDPOINT}/status/{body['id']}") == w.api.ok("GET", f"/status/{body['id']}")
    status, other = w.api.get(f"/v2/not-{ENDPOINT}/status/{body['id']}")
    assert status == 404 and "endpoint" in other["error"]


def test_runsync_wait_elapses_with_the_id_and_current_status(w: ApiWorker) -> None:
    started = time.monotonic()
    body = w.api.ok("POST", "/runsync?wait=300", with_steps(SEED_001, 40))
    assert time.monotonic() - started < 1.5
    assert body == {"id": body["id"], "status": body["status"]} and body["status"] in ("IN_QUEUE", "IN_PROGRESS")
    final = w.api.wait_status(body["id"], ("COMPLETED",))
    assert final["output"]["images"]


def test_cancel_queued_and_running_jobs(w: ApiWorker) -> None:
    running = blocker(w, steps=200)
    queued = w.api.ok("POST", "/run", SEED_001)["id"]
    assert w.api.ok("POST", f"/cancel/{queued}") == {"id": queued, "status": "CANCELLED"}
    assert w.api.ok("GET", f"/status/{queued}")["status"] == "CANCELLED"
    before = len([r for r in comfy_requests(w) if r["path"] == "/interrupt"])
    started = time.monotonic()
    assert w.api.ok("POST", f"/cancel/{running}") == {"id": running, "status": "CANCELLED"}
    assert time.monotonic() - started < 1  # answered at once (200 steps would take 10 s)
    body = w.api.ok("GET", f"/status/{running}")
    assert body["status"] == "CANCELLED" and "output" not in body
    # /cancel answered at once; ComfyUI is interrupted in the background
    wait_for(lambda: len([r for r in comfy_requests(w) if r["path"] == "/interrupt"]) > before, 5,
             what="ComfyUI to be interrupted")
    wait_for(lambda: comfy_queue(w) == {"queue_running": [], "queue_pending": []}, 10, what="ComfyUI's queue to empty")
    # cancelling a finished job changes nothing
    assert w.api.ok("POST", f"/cancel/{running}") == {"id": running, "status": "CANCELLED"}
    # and the worker goes on
    assert w.api.ok("POST", "/runsync", with_steps(SEED_001, 2))["status"] == "COMPLETED"


def test_auth_is_required_everywhere_but_health(w: ApiWorker) -> None:
    for method, path in (("POST", "/run"), ("POST", "/runsync"), ("GET", "/status/x"), ("POST", "/cancel/x"),
                         ("GET", "/stream/x"), ("GET", "/workflows"), ("POST", f"/v2/{ENDPOINT}/run"),
                         ("POST", "/api/run"), ("GET", "/api/run?run_id=x"), ("POST", "/api/upload-url")):
        status, body = w.api.request(method, path, {"input": {}}, key=None)
        assert status == 401, (method, path, status, body)
        assert body == {"error": "Unauthorized: send the header 'Authorization: Bearer <API_KEY>'"}
        status, _ = w.api.request(method, path, {"input": {}}, key="wrong-key")
        assert status == 401
    assert w.api.get("/health", key=None)[0] == 200
    assert w.api.get(f"/v2/{ENDPOINT}/health", key=None)[0] == 200
    # RunPod also accepts the bare key in the Authorization header
    status, _ = w.api.request("GET", "/workflows", key=None, headers={"Authorization": KEY})
    assert status == 200
    assert KEY not in w.log_text()


def test_limits_413_and_429(w: ApiWorker) -> None:
    big = {"input": {"workflow": SEED_001["input"]["workflow"], "padding": "x" * 300_000}}
    status, body = w.api.post("/run", big)
    assert status == 413 and "MAX_REQUEST_BYTES" in body["error"], body
    running = blocker(w, steps=200)
    queued = [w.api.ok("POST", "/run", SEED_001)["id"] for _ in range(3)]
    status, body = w.api.post("/run", SEED_001)
    assert status == 429 and "MAX_QUEUE" in body["error"], body
    assert w.api.ok("POST", "/purge-queue") == {"removed": 3, "status": "completed"}
    assert {w.api.ok("GET", f"/status/{j}")["status"] for j in queued} == {"CANCELLED"}
    w.api.ok("POST", f"/cancel/{running}")


def test_bad_requests_are_400_and_unknown_jobs_404(w: ApiWorker) -> None:
    status, body = w.api.request("POST", "/run", raw=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"].startswith("the request body is not JSON")
    status, body = w.api.post("/run", {"workflow": {}})
    assert status == 400 and "'input'" in body["error"]
    status, body = w.api.post("/run", {"input": {}, "webhook": "ftp://example.com/x"})
    assert status == 400 and "webhook" in body["error"]
    status, body = w.api.get("/status/no-such-job")
    assert status == 404 and body["error"].startswith("job 'no-such-job' not found")
    status, body = w.api.get("/no/such/route")
    assert status == 404 and body == {"error": "not found: GET /no/such/route"}
    # an unusable input is a FAILED job with the engine's message, as on RunPod
    body = w.api.ok("POST", "/runsync", {"input": {"nodes": [], "links": []}})
    assert body["status"] == "FAILED" and "Export (API)" in body["error"], body
    assert_shape(body, seed("001_response_error.json"), extra=("$.delayTime", "$.executionTime"))


def test_health_has_runpods_shape_and_the_supervisor_status(w: ApiWorker) -> None:
    status, body = w.api.get("/health", key=None)
    assert status == 200
    assert set(body) == {"jobs", "workers", "comfyui", "instances"}
    assert set(body["jobs"]) >= {"completed", "failed", "inProgress", "inQueue"}
    assert set(body["workers"]) >= {"idle", "running"}
    assert body["workers"]["idle"] + body["workers"]["running"] == 1
    assert body["comfyui"]["state"] == "ready" and body["comfyui"]["pid"]
    assert body["jobs"]["completed"] >= 0
    # one ComfyUI instance (the default): the same process, its own job counts
    [one] = body["instances"]
    assert one["instance"] == "0" and one["pid"] == body["comfyui"]["pid"] and one["state"] == "ready"
    assert one["port"] == int(w.env["COMFYUI_PORT"]) and one["gpu"] is None
    assert one["jobs"]["completed"] <= body["jobs"]["completed"] and one["jobs"]["inProgress"] >= 0


def test_stream_gives_progress_items_then_the_output(w: ApiWorker) -> None:
    job = w.api.ok("POST", "/run", with_steps(SEED_001, 10))["id"]
    items: list[Any] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = w.api.ok("GET", f"/stream/{job}")
        assert set(body) >= {"status", "stream"}
        items += [chunk["output"] for chunk in body["stream"]]
        if body["status"] == "COMPLETED" and not body["stream"]:
            break
        time.sleep(0.05)
    steps = [i for i in items if isinstance(i, dict) and i.get("step")]
    assert [s["step"] for s in steps] == sorted(s["step"] for s in steps) and steps[-1]["max"] == 10, items
    assert items[-1]["images"][0]["filename"] == "ComfyUI_00001_.png"  # the final output, streamed once


def test_the_runpod_sdk_client_works_unchanged(w: ApiWorker) -> None:
    import runpod

    runpod.api_key = KEY
    runpod.endpoint_url_base = f"{w.api.base}/v2"
    endpoint = runpod.Endpoint(ENDPOINT)
    output = endpoint.run_sync(with_steps(SEED_001, 2)["input"], timeout=60)
    assert output["images"][0]["type"] == "base64"
    job = endpoint.run(with_steps(SEED_001, 5))
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    chunks = list(job.stream())
    assert chunks and chunks[-1]["images"]
    assert job.output(timeout=60)["images"]
    long_job = endpoint.run(with_steps(SEED_001, 200))
    wait_for(lambda: long_job.status() == "IN_PROGRESS", 30, what="the job to run")
    assert long_job.cancel()["status"] == "CANCELLED"
    # /cancel answers at once; the job leaves ComfyUI (the next sampler step) in the background
    wait_for(lambda: endpoint.health()["workers"]["running"] == 0, 5, what="the cancelled job to leave ComfyUI")


class _Receiver:
    def __init__(self) -> None:
        self.bodies: list[Any] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.bodies.append(json.loads(data))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def test_webhook_gets_the_result_through_the_ssrf_guard(w: ApiWorker) -> None:
    receiver = _Receiver()
    try:
        job = w.api.ok("POST", "/run", {**with_steps(SEED_001, 2), "webhook": receiver.url})["id"]
        wait_for(lambda: receiver.bodies, 30, what="the webhook")
        body = receiver.bodies[0]
        assert body["id"] == job and body["status"] == "COMPLETED" and body["output"]["images"]
        assert body == w.api.ok("GET", f"/status/{job}")
        # a webhook into the cloud metadata service is refused by the guard, and the job is unaffected
        refused = w.api.ok("POST", "/runsync", {**with_steps(SEED_001, 2),
                                                "webhook": "http://169.254.169.254/latest/meta-data/"})
        assert refused["status"] == "COMPLETED"
        wait_for(lambda: f"job {refused['id']}: webhook not sent" in w.log_text(), 10, what="the refusal log")
    finally:
        receiver.server.shutdown()


def test_named_workflows_run_by_name_with_typed_parameters(w: ApiWorker) -> None:
    listing = w.api.ok("GET", "/workflows")
    names = [wf["name"] for wf in listing["workflows"]]
    assert names == ["sdxl_ipadapter_face", "sdxl_txt2img"] and listing["unusable"] == {}
    body = w.api.ok("POST", "/runsync", {"input": {"workflow": "sdxl_txt2img",
                                                   "inputs": {"prompt": "a red fox", "seed": 7, "steps": 2}}})
    assert body["status"] == "COMPLETED", body
    fox = body["output"]["images"][0]["data"]
    again = w.api.ok("POST", "/runsync", {"input": {"workflow": "sdxl_txt2img",
                                                    "inputs": {"prompt": "a red fox", "seed": 8, "steps": 2}}})
    assert again["output"]["images"][0]["data"] != fox  # the seed reached the sampler
    bad = w.api.ok("POST", "/runsync", {"input": {"workflow": "sdxl_txt2img",
                                                  "inputs": {"promt": "typo", "seed": "seven"}}})
    assert bad["status"] == "FAILED"
    assert bad["error"].splitlines()[0] == "Invalid input: 2 problems:"
    assert "workflow 'sdxl_txt2img' has no parameter 'promt' (parameters: prompt (string" in bad["error"]
    assert "parameter 'seed' must be an integer; got \"seven\"" in bad["error"]
    unknown = w.api.ok("POST", "/runsync", {"input": {"workflow": "sdxl", "inputs": {}}})
    assert unknown["error"] == ("Invalid input: no workflow named 'sdxl'; available: sdxl_ipadapter_face, "
                                "sdxl_txt2img")
    from tests.helpers.jobs import b64, png_bytes

    face = w.api.ok("POST", "/runsync", {"input": {"workflow": "face", "inputs": {
        "face": "data:image/png;base64," + b64(png_bytes(size=(64, 64))), "steps": 2, "prompt": "a portrait"}}})
    assert face["status"] == "COMPLETED", face
    missing = w.api.ok("POST", "/runsync", {"input": {"workflow": "sdxl_ipadapter_face", "inputs": {"steps": 2}}})
    assert missing["status"] == "FAILED" and "needs parameter 'face'" in missing["error"], missing


def test_a_job_past_its_own_deadline_is_timed_out(w: ApiWorker) -> None:
    body = with_steps(SEED_001, 100)
    body["input"]["timeout_s"] = 0.5
    result = w.api.ok("POST", "/runsync", body)
    assert result["status"] == "TIMED_OUT", result
    assert result["error"].startswith("Job timed out after 0.5 s"), result
    wait_for(lambda: comfy_queue(w) == {"queue_running": [], "queue_pending": []}, 10, what="ComfyUI's queue to empty")


def test_an_uploaded_file_feeds_an_image_parameter_through_the_deploy_facade(w: ApiWorker) -> None:
    from tests.helpers.jobs import png_bytes

    upload = w.api.ok("POST", "/api/upload-url", {"filename": "face.png", "content_type": "image/png"})
    assert upload["upload_url"].startswith(w.api.base + "/api/upload/")
    status, _ = w.api.request("PUT", upload["upload_url"], raw=png_bytes((10, 200, 10), (64, 64)), key=None)
    assert status == 200
    run = w.api.ok("POST", "/api/run", {"deployment_id": "face",
                                        "inputs": {"face": upload["file_url"], "steps": 2}})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = w.api.ok("GET", f"/api/run?run_id={run['run_id']}")
        if out["status"] in ("success", "failed"):
            break
        time.sleep(0.05)
    assert out["status"] == "success", out
    assert out["workflow_inputs"] == {"face": upload["file_url"], "steps": 2}
    # a second face gives another image: the uploaded bytes reached LoadImage
    other = w.api.ok("POST", "/api/upload-url", {"filename": "face2.png", "content_type": "image/png"})
    w.api.request("PUT", other["upload_url"], raw=png_bytes((200, 10, 10), (64, 64)), key=None)
    run2 = w.api.ok("POST", "/api/run", {"deployment_id": "face", "inputs": {"face": other["file_url"], "steps": 2}})
    wait_for(lambda: w.api.ok("GET", f"/api/run?run_id={run2['run_id']}")["status"] == "success", 60,
             what="the second run")
    out2 = w.api.ok("GET", f"/api/run?run_id={run2['run_id']}")
    first = w.api.get(out["workflow_outputs"]["images"][0]["url"])[1]
    second = w.api.get(out2["workflow_outputs"]["images"][0]["url"])[1]
    assert first.startswith(b"\x89PNG") and second.startswith(b"\x89PNG") and first != second
    # an expired or unknown upload URL is refused
    status, body = w.api.request("PUT", w.api.base + "/api/upload/" + "x" * 32, raw=b"data", key=None)
    assert status == 404 and "upload URL" in body["error"]
