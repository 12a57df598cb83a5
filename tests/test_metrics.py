"""``GET /metrics``: every family checked against what really happened to a real worker.

Jobs of every outcome (COMPLETED, FAILED, CANCELLED, TIMED_OUT) run through the self-hosted API while the test
scrapes; ComfyUI (the stand-in) is killed with SIGKILL. The scrape is parsed with prometheus-client's own parser,
and each family is compared with the jobs' own bodies: counts, the queue rising and falling, phase histograms,
bytes in and out, readiness, restarts and start time. RunPod mode serves the same registry on METRICS_PORT.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.api import ROOT, api_worker, http_get, seed, seed_models, write_models
from tests.helpers.runpod_server import RunPodJobServer
from tests.helpers.standin import free_port
from tests.helpers.worker import WorkerProcess, tree_processes, wait_for, worker_env

pytestmark = pytest.mark.timeout(180)

KEY = "metrics-key-0123"
SEED_001 = seed("001_request.json")
SEED_001_IMAGES = seed("001_request_images.json")
STATUSES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
PHASES = ("queue", "inputs", "comfyui", "outputs", "total")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def with_steps(body: dict[str, Any], steps: int, **options: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    out["input"]["workflow"]["31"]["inputs"]["steps"] = steps
    out["input"].update(options)
    return out


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(base: str, key: str | None = KEY) -> Samples:
    status, headers, body = http_get(f"{base}/metrics", {"Authorization": f"Bearer {key}"} if key else None)
    assert status == 200, (status, body[:300])
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers["Content-Type"]
    return parse(body.decode())


def val(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k[0] for k in samples if k[0].startswith(name))}"
    return samples[key]


def jobs(samples: Samples, door: str = "api") -> dict[str, float]:
    return {s: val(samples, "comfyui_worker_jobs_total", front_door=door, status=s) for s in STATUSES}


def phase_counts(samples: Samples) -> dict[str, float]:
    return {p: val(samples, "comfyui_worker_job_duration_seconds_count", phase=p) for p in PHASES}


def decoded_size(b64: str) -> int:
    return len(base64.b64decode(b64.split(",", 1)[-1]))


def test_every_family_follows_jobs_of_every_outcome_and_a_kill_9(tmp_path: Path) -> None:
    write_models(tmp_path / "models", seed_models("001_request.json"))
    with api_worker(tmp_path, API_KEY=KEY, STANDIN_STEP_DELAY_S="0.05", STANDIN_START_DELAY_S="0.5",
                    PROGRESS_INTERVAL_S="0") as w:
        base = w.api.base
        assert http_get(f"{base}/metrics")[0] == 401  # behind the key unless METRICS_PUBLIC
        first = scrape(base)
        assert jobs(first) == dict.fromkeys(STATUSES, 0) and jobs(first, "deploy") == dict.fromkeys(STATUSES, 0)
        assert phase_counts(first) == dict.fromkeys(PHASES, 0)
        assert val(first, "comfyui_worker_comfyui_ready", instance="0") == 1
        assert val(first, "comfyui_worker_comfyui_start_seconds", instance="0") >= 0.5  # the stand-in's delay
        assert all(v == 0 for (name, _), v in first.items() if name == "comfyui_worker_comfyui_restarts_total")
        # the stand-in runs with --cpu: ComfyUI reports one "cpu" device (its memory is the system's RAM)
        total = val(first, "comfyui_worker_gpu_memory_total_bytes", instance="0", device="cpu")
        assert 0 < val(first, "comfyui_worker_gpu_memory_used_bytes", instance="0", device="cpu") <= total

        # one job runs, three wait: the queue rises, then falls as one is cancelled and the others run
        blocker = w.api.ok("POST", "/run", with_steps(SEED_001, 40))["id"]
        w.api.wait_status(blocker, ("IN_PROGRESS",))
        with_image = w.api.ok("POST", "/run", with_steps(SEED_001_IMAGES, 2))["id"]
        bad = copy.deepcopy(SEED_001)
        bad["input"]["workflow"]["30"]["inputs"]["ckpt_name"] = "not-installed.safetensors"
        failing = w.api.ok("POST", "/run", bad)["id"]
        cancelled = w.api.ok("POST", "/run", with_steps(SEED_001, 2))["id"]
        rising = scrape(base)
        assert val(rising, "comfyui_worker_queue_depth") == 3
        assert val(rising, "comfyui_worker_jobs_in_progress") == 1
        assert w.api.ok("POST", f"/cancel/{cancelled}")["status"] == "CANCELLED"
        assert val(scrape(base), "comfyui_worker_queue_depth") == 2
        for job in (blocker, with_image, failing):
            w.api.wait_status(job, ("COMPLETED", "FAILED"), timeout=60)
        timed_out = w.api.ok("POST", "/runsync", with_steps(SEED_001, 200, timeout_s=0.3))
        assert timed_out["status"] == "TIMED_OUT", timed_out

        after = scrape(base)
        assert val(after, "comfyui_worker_queue_depth") == 0 and val(after, "comfyui_worker_jobs_in_progress") == 0
        assert jobs(after) == {"COMPLETED": 2, "FAILED": 1, "CANCELLED": 1, "TIMED_OUT": 1}
        # total: every finished job; queue and inputs: every job that started (the cancelled one never did);
        # comfyui and outputs: the two whose prompt ran to its end
        assert phase_counts(after) == {"queue": 4, "inputs": 4, "comfyui": 2, "outputs": 2, "total": 5}
        sums = {p: val(after, "comfyui_worker_job_duration_seconds_sum", phase=p) for p in PHASES}
        assert sums["comfyui"] >= 40 * 0.05 and sums["total"] > sums["comfyui"] + sums["outputs"], sums
        assert val(after, "comfyui_worker_job_duration_seconds_bucket", phase="total", le="+Inf") == 5
        sent = sum(decoded_size(i["image"]) for i in SEED_001_IMAGES["input"]["images"])
        assert val(after, "comfyui_worker_input_bytes_total") == sent
        returned = sum(decoded_size(img["data"]) for job in (blocker, with_image)
                       for img in w.api.ok("GET", f"/status/{job}")["output"]["images"])
        assert val(after, "comfyui_worker_output_bytes_total") == returned > 0

        # kill -9: not ready while it restarts (the stand-in takes 0.5 s), then a restart with its reason
        pid = w.api.ok("GET", "/health")["comfyui"]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: val(scrape(base), "comfyui_worker_comfyui_ready", instance="0") == 0, 10,
                 interval=0.01, what="comfyui_ready to fall to 0")
        w.wait_ready()
        final = scrape(base)
        assert val(final, "comfyui_worker_comfyui_ready", instance="0") == 1
        assert val(final, "comfyui_worker_comfyui_restarts_total", instance="0", reason="exited") == 1
        assert sum(v for (name, _), v in final.items() if name == "comfyui_worker_comfyui_restarts_total") == 1
        assert val(final, "comfyui_worker_comfyui_start_seconds", instance="0") >= 0.5
        assert w.api.ok("GET", "/health")["comfyui"]["restarts"] == 1


def test_metrics_public_opens_only_metrics_and_disabled_serves_none(tmp_path: Path) -> None:
    for sub in ("public", "off"):
        (tmp_path / sub).mkdir()
    with api_worker(tmp_path / "public", API_KEY=KEY, METRICS_PUBLIC="true") as w:
        samples = scrape(w.api.base, key=None)
        assert val(samples, "comfyui_worker_comfyui_ready", instance="0") == 1
        assert http_get(f"{w.api.base}/info")[0] == 401  # /info stays behind the key
    with api_worker(tmp_path / "off", API_KEY=KEY, METRICS_ENABLED="false") as w:
        status, _, body = http_get(f"{w.api.base}/metrics", {"Authorization": f"Bearer {KEY}"})
        assert status == 404 and json.loads(body) == {"error": "metrics are turned off (METRICS_ENABLED=false)"}
        assert w.api.ok("POST", "/runsync", {"input": {"workflow": _tiny_graph()}})["status"] == "COMPLETED"


def test_runpod_mode_serves_the_registry_on_metrics_port(tmp_path: Path) -> None:
    write_models(tmp_path / "models", seed_models("001_request.json"))
    metrics_port = free_port()
    with RunPodJobServer() as rp:
        env = worker_env(tmp_path, METRICS_PORT=str(metrics_port), API_HOST="127.0.0.1", PROGRESS_INTERVAL_S="0")
        env.pop("WORKER_MODE", None)
        env.update(rp.env())
        worker = WorkerProcess(env, tmp_path / "worker.log")
        try:
            base = f"http://127.0.0.1:{metrics_port}"
            wait_for(lambda: _answers(base), 30, what=f"/metrics on METRICS_PORT\n{worker.log_text()[-2000:]}")
            ok = rp.enqueue(with_steps(SEED_001, 2)["input"])
            assert "output" in rp.wait_result(ok, timeout=60)
            bad = copy.deepcopy(SEED_001["input"])
            bad["workflow"]["30"]["inputs"]["ckpt_name"] = "not-installed.safetensors"
            assert "error" in rp.wait_result(rp.enqueue(bad), timeout=60)
            samples = scrape(base, key=None)
            assert jobs(samples, "runpod") == {"COMPLETED": 1, "FAILED": 1, "CANCELLED": 0, "TIMED_OUT": 0}
            assert phase_counts(samples) == {"queue": 2, "inputs": 2, "comfyui": 1, "outputs": 1, "total": 2}
            assert val(samples, "comfyui_worker_queue_depth") == 0
            assert val(samples, "comfyui_worker_comfyui_ready", instance="0") == 1
        finally:
            worker.shutdown()


def test_runpod_mode_refuses_open_metrics_on_a_public_address(tmp_path: Path) -> None:
    env = worker_env(tmp_path, WORKER_MODE="runpod", API_HOST="0.0.0.0", METRICS_PORT=str(free_port()))
    env.pop("API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "supervisor"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve /metrics on 0.0.0.0" in proc.stderr and "METRICS_PUBLIC=true" in proc.stderr
    assert not tree_processes(env["TEST_TREE_ID"])  # ComfyUI was never started


def _answers(base: str) -> bool:
    try:
        return http_get(f"{base}/metrics", timeout=2)[0] == 200
    except OSError:
        return False


def _tiny_graph() -> dict[str, Any]:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "m"}}}

