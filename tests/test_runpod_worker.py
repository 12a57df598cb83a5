"""RunPod mode end to end: the UNMODIFIED RunPod SDK worker loop, driven by a loopback job server.

Each test starts the real worker (``python -m supervisor``) with the platform's environment pointing at
``tests/helpers/runpod_server.py`` (job-take, job-take-batch, job-stop, job-done, job-stream, ping on
127.0.0.1) and the stand-in ComfyUI behind it. Mode detection is automatic (``RUNPOD_WEBHOOK_GET_JOB`` is set,
``WORKER_MODE`` is not). Jobs, stop requests and results go through the SDK's production code.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.api import assert_shape, png_of, seed, seed_models, write_models
from tests.helpers.runpod_server import API_KEY, RunPodJobServer
from tests.helpers.worker import WorkerProcess, describe_process, tree_processes, wait_for, worker_env

pytestmark = pytest.mark.timeout(120)

SEED_001 = seed("001_request.json")["input"]
FLUX = seed_models("001_request.json")


@contextmanager
def runpod_worker(tmp_path: Path, models: dict[str, list[str]] | None = None,
                  **env: Any) -> Iterator[tuple[RunPodJobServer, WorkerProcess]]:
    write_models(tmp_path / "models", models if models is not None else FLUX)
    with RunPodJobServer() as rp:
        full = worker_env(tmp_path, STANDIN_REQUEST_LOG=str(tmp_path / "comfy-requests.jsonl"),
                          PROGRESS_INTERVAL_S="0", **env)
        full.pop("WORKER_MODE", None)
        full.update(rp.env())
        worker = WorkerProcess(full, tmp_path / "worker.log")
        try:
            yield rp, worker
        finally:
            if worker.proc.poll() is None:
                worker.signal(signal.SIGTERM)
                try:
                    worker.proc.wait(30)
                except Exception:  # noqa: BLE001 - cleanup() kills it
                    pass
            worker.cleanup()
            leftovers = tree_processes(full["TEST_TREE_ID"])
            described = [describe_process(proc) for proc in leftovers]
            for proc in leftovers:
                proc.kill()
            assert not leftovers, f"processes survived the worker: {described}"


def comfy_requests(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "comfy-requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def comfy_queue(worker: WorkerProcess) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{worker.env['COMFYUI_PORT']}/queue", timeout=5) as resp:
        return json.loads(resp.read())


def test_job_completes_failing_job_fails_clearly_and_progress_is_posted(tmp_path: Path) -> None:
    with runpod_worker(tmp_path) as (rp, worker):
        ok = rp.enqueue(SEED_001)
        result = rp.wait_result(ok, timeout=60)
        assert set(result) == {"output"}, result
        documented = seed("001_response_success.json")["output"]
        assert_shape(result["output"], documented, optional=("$.errors",))
        image = result["output"]["images"][0]
        assert image["filename"] == "ComfyUI_00001_.png" and image["type"] == "base64"
        assert png_of(image["data"]).size == (1024, 1024)

        progress = rp.progress(ok)
        assert progress, "no progress update was posted"
        assert all(p["job_id"] == ok for p in progress)
        steps = [p for p in progress if p.get("step") is not None]
        assert steps and steps[-1]["max"] == 20 and steps[-1]["node_type"] == "KSampler", progress

        # the same graph with a model that is not installed: the official worker's message, nothing else
        bad = json.loads(json.dumps(SEED_001))
        bad["workflow"]["30"]["inputs"]["ckpt_name"] = "model.safetensors"
        failing = rp.enqueue(bad)
        result = rp.wait_result(failing, timeout=30)
        assert set(result) == {"error"}, result
        assert isinstance(result["error"], str)
        first = result["error"].splitlines()[0]
        assert first.startswith("Workflow validation failed:"), result["error"]
        assert "model.safetensors" in first and "flux1-dev-fp8.safetensors" in result["error"]

        # a named workflow that does not exist: the names that do
        named = rp.enqueue({"workflow": "no-such-workflow", "inputs": {}})
        result = rp.wait_result(named, timeout=30)
        assert result["error"].startswith("Invalid input: no workflow named 'no-such-workflow'; available: "), result

    assert "RunPod worker loop starting" in worker.log_text()
    assert API_KEY in rp.auth_headers  # the SDK really talked to our server as the platform
    assert rp.takes[0]["route"] == "job-take" and rp.takes[0]["query"]["job_in_progress"] == ["0"]


def test_execution_error_and_seed_formats(tmp_path: Path) -> None:
    """A node that raises gives one clear line; response_format per request (seed 000 keeps COMPLETED)."""
    with runpod_worker(tmp_path, STANDIN_NODE_FAULT="31:error:sampler exploded") as (rp, _worker):
        failing = rp.enqueue(SEED_001)
        result = rp.wait_result(failing, timeout=60)
        assert result == {"error": result["error"]}
        assert result["error"].splitlines()[0] == (
            "Workflow execution error: node 31 (KSampler) raised Exception: sampler exploded"), result

        as_000 = rp.enqueue({**SEED_001, "response_format": "results"})
        result = rp.wait_result(as_000, timeout=60)
        assert set(result) == {"output"}, result  # seed 000's handler returned its failures as output
        assert_shape(result["output"], seed("000_response_error.json"))
        assert result["output"]["status"] == "error"


def test_seed_formats_succeed_with_their_documented_output(tmp_path: Path) -> None:
    models = seed_models("000_request.json", "003_request.json", "002_request_txt2img.json", "001_request.json")
    with runpod_worker(tmp_path, models=models) as (rp, _worker):
        jobs = {
            "000": rp.enqueue({**seed("000_request.json")["input"], "response_format": "results"}),
            "002": rp.enqueue(seed("002_request_txt2img.json")["input"]),
            "003": rp.enqueue({**seed("003_request.json")["input"], "response_format": "base64-list"}),
        }
        r000 = rp.wait_result(jobs["000"], timeout=60)
        assert_shape(r000["output"], seed("000_response_success.json"))
        png_of(r000["output"]["results"][0]["image"])
        r002 = rp.wait_result(jobs["002"], timeout=60)
        # seed 002 sends the bare graph (no options): this worker's default format answers it
        assert_shape(r002["output"], seed("001_response_success.json")["output"], optional=("$.errors",))
        r003 = rp.wait_result(jobs["003"], timeout=60)
        assert_shape(r003["output"], seed("003_response_success.json")["output"])
        png_of(r003["output"]["images"][0])


def test_mime_deployment_format_answers_seed_002(tmp_path: Path) -> None:
    models = seed_models("002_request_txt2img.json")
    with runpod_worker(tmp_path, models=models, RESPONSE_FORMAT="mime") as (rp, _worker):
        job = rp.enqueue(seed("002_request_txt2img.json")["input"])
        result = rp.wait_result(job, timeout=60)
        assert_shape(result["output"], seed("002_response_output_success.json"))
        item = result["output"]["images"][0]
        assert item["type"] == "image/png" and item["filename"] == "ComfyUI_00001_.png"
        png_of(item["data"])
        faceid = rp.enqueue(seed("002_request_faceid.json")["input"])
        result = rp.wait_result(faceid, timeout=60)
        assert set(result) == {"error"}  # seed 002's failure shape: FAILED with the message
        assert result["error"].startswith("Workflow validation failed: "), result


def test_cancelled_job_interrupts_comfyui_and_leaves_its_queue_empty(tmp_path: Path) -> None:
    with runpod_worker(tmp_path, STANDIN_STEP_DELAY_S="0.25") as (rp, worker):
        job = rp.enqueue(SEED_001)
        rp.wait_for(lambda: any((p.get("step") or 0) >= 2 for p in rp.progress(job)), 60, "sampler progress")
        stopped_at = time.monotonic()
        rp.request_stop(job)
        interrupted = wait_for(lambda: [r for r in comfy_requests(tmp_path) if r["path"] == "/interrupt"], 15,
                               what="ComfyUI to be interrupted")
        assert interrupted
        wait_for(lambda: comfy_queue(worker) == {"queue_running": [], "queue_pending": []}, 15,
                 what="ComfyUI's queue to be empty")
        assert time.monotonic() - stopped_at < 10  # 20 steps x 0.25 s would have taken 5 s more
        time.sleep(1.0)
        assert rp.results(job) == []  # the SDK posts nothing for a stopped job
        # the worker goes on: the next job runs normally
        nxt = rp.enqueue(SEED_001 | {"workflow": {**SEED_001["workflow"], "31": {
            **SEED_001["workflow"]["31"], "inputs": {**SEED_001["workflow"]["31"]["inputs"], "steps": 2}}}})
        assert "output" in rp.wait_result(nxt, timeout=60)


def test_refresh_worker_exits_after_one_job(tmp_path: Path) -> None:
    with runpod_worker(tmp_path, REFRESH_WORKER="true") as (rp, worker):
        first = rp.enqueue(SEED_001)
        second = rp.enqueue(SEED_001)
        result = rp.wait_result(first, timeout=60)
        assert result.get("stopPod") is True and "output" in result
        assert worker.proc.wait(30) == 0
        assert rp.results(second) == [] and rp.pending() == 1  # the second job stays with the platform


def test_sigterm_mid_job_posts_the_result_then_exits_cleanly(tmp_path: Path) -> None:
    with runpod_worker(tmp_path, STANDIN_STEP_DELAY_S="0.1") as (rp, worker):
        job = rp.enqueue(SEED_001)
        rp.wait_for(lambda: any((p.get("step") or 0) >= 1 for p in rp.progress(job)), 60, "sampler progress")
        worker.signal(signal.SIGTERM)
        result = rp.wait_result(job, timeout=30)
        assert "output" in result and result["output"]["images"], result
        assert worker.proc.wait(40) == 0
        assert "stopping ComfyUI" in worker.log_text() or "ComfyUI stopping" in worker.log_text()


def test_concurrency_takes_batches_and_runs_jobs_together(tmp_path: Path) -> None:
    with runpod_worker(tmp_path, MAX_CONCURRENCY="2", STANDIN_STEP_DELAY_S="0.05") as (rp, _worker):
        rp.wait_for(lambda: any(t["route"] == "job-take-batch" for t in rp.takes), 30, "a batch take")
        a, b = rp.enqueue(SEED_001), rp.enqueue(SEED_001)
        ra, rb = rp.wait_result(a, timeout=60), rp.wait_result(b, timeout=60)
        assert "output" in ra and "output" in rb
        batches = [t for t in rp.takes if t["jobs"]]
        assert all(t["route"] == "job-take-batch" and t["query"]["batch_size"][0] in ("1", "2") for t in batches)


def test_failed_supervisor_ends_the_worker(tmp_path: Path) -> None:
    with runpod_worker(tmp_path, STANDIN_START_FAULT="exit:3", CRASH_LOOP_MAX="2", RESTART_BACKOFF_S="0",
                       RESTART_BACKOFF_MAX_S="0") as (_rp, worker):
        assert worker.proc.wait(60) == 1
        assert "failed" in worker.log_text()


def test_comfyui_failing_for_good_mid_job_fails_the_job_then_ends_the_worker(tmp_path: Path) -> None:
    with runpod_worker(tmp_path, STANDIN_NODE_FAULT="KSampler:exit:7", CRASH_LOOP_MAX="1") as (rp, worker):
        job = rp.enqueue(SEED_001)
        result = rp.wait_result(job, timeout=60)
        assert set(result) == {"error"}
        first = result["error"].splitlines()[0]
        assert re.fullmatch(r"ComfyUI stopped while .+: ComfyUI \(pid \d+\) exited with code 7", first), result
        assert "RuntimeError: standin: injected exit at node 31 (KSampler)" in result["error"]  # its last lines
        assert worker.proc.wait(60) == 1
        assert "ending the worker: ComfyUI failed 1 time within" in worker.log_text()


def test_a_job_waits_for_comfyui_at_most_ready_wait_s(tmp_path: Path) -> None:
    with runpod_worker(tmp_path, STANDIN_START_DELAY_S="8", READY_WAIT_S="0.5") as (rp, _worker):
        job = rp.enqueue(SEED_001)
        result = rp.wait_result(job, timeout=30)
        assert result["error"].startswith("ComfyUI was not ready within 0.5 s (state starting: "), result
        assert result["error"].splitlines()[0].endswith("(READY_WAIT_S)")
