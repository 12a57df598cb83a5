"""The probes of the self-hosted API: liveness (/health), readiness (/ready) and RunPod's /ping.

A worker that merely restarts ComfyUI is alive (``/health`` 200) but must not get jobs (``/ready`` 503); only a
``failed`` supervisor makes ``/health`` 503. ``/ping`` answers RunPod's way: 204 while initializing, 200 when
ready. Every test drives the real worker process (or, for ``failed``, the real supervisor and app in this process,
because a failed worker exits within milliseconds) over real HTTP; ComfyUI is the stand-in, killed for real.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.helpers.api import ApiWorker, api_worker, http_get, seed, seed_models, write_models
from tests.helpers.standin import free_port
from tests.helpers.worker import running_supervisor, wait_for, worker_env

pytestmark = pytest.mark.timeout(120)

KEY = "probe-key-0123"
SEED_001 = seed("001_request.json")


def with_steps(steps: int) -> dict[str, Any]:
    out = copy.deepcopy(SEED_001)
    out["input"]["workflow"]["31"]["inputs"]["steps"] = steps
    return out


def probes(w: ApiWorker) -> dict[str, int]:
    """One round of the three probes, without a key (they are open)."""
    return {p: http_get(f"{w.api.base}/{p}")[0] for p in ("health", "ready", "ping")}


def watch(w: ApiWorker, until: Callable[[dict[str, int]], bool], timeout: float) -> list[dict[str, int]]:
    """Every distinct round of probe answers until ``until`` holds for one."""
    seen: list[dict[str, int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            now = probes(w)
        except OSError:  # not listening yet
            time.sleep(0.01)
            continue
        if not seen or seen[-1] != now:
            seen.append(now)
        if until(now):
            return seen
        time.sleep(0.01)
    raise AssertionError(f"probes never reached the expected answers; seen: {seen}\n{w.log_text()[-2000:]}")


READY = {"health": 200, "ready": 200, "ping": 200}
STARTING = {"health": 200, "ready": 503, "ping": 204}


def test_start_and_a_comfyui_restart_keep_it_alive_but_not_ready(tmp_path: Path) -> None:
    worker = ApiWorker(tmp_path, API_KEY=KEY, STANDIN_START_DELAY_S="0.8")
    worker.start(wait=False)
    try:
        seen = watch(worker, lambda p: p == READY, 30)
        assert seen[0] == STARTING and seen[-1] == READY, seen
        assert all(p["health"] == 200 for p in seen), seen  # alive throughout

        status, headers, body = http_get(f"{worker.api.base}/ready")
        assert status == 200 and json.loads(body)["ready"] is True
        pid = worker.api.ok("GET", "/health")["comfyui"]["pid"]
        os.kill(pid, signal.SIGKILL)
        during = watch(worker, lambda p: p == STARTING, 10)
        status, headers, body = http_get(f"{worker.api.base}/ready")
        answer = json.loads(body)
        assert status == 503 and headers["Retry-After"] == "5", (status, dict(headers))
        assert answer["ready"] is False and answer["state"] in ("restarting", "starting")
        assert answer["reason"].startswith("ComfyUI is restarting"), answer
        after = watch(worker, lambda p: p == READY, 30)
        assert all(p["health"] == 200 for p in during + after), (during, after)
        health = worker.api.ok("GET", "/health")
        assert health["comfyui"]["restarts"] == 1 and health["comfyui"]["pid"] != pid
    finally:
        _stop(worker)


def test_a_full_queue_makes_it_not_ready_and_429_says_when_to_retry(tmp_path: Path) -> None:
    write_models(tmp_path / "models", seed_models("001_request.json"))
    with api_worker(tmp_path, API_KEY=KEY, MAX_QUEUE="2", STANDIN_STEP_DELAY_S="0.05") as w:
        running = w.api.ok("POST", "/run", with_steps(400))["id"]
        w.api.wait_status(running, ("IN_PROGRESS",))
        assert probes(w) == READY
        queued = [w.api.ok("POST", "/run", with_steps(2))["id"] for _ in range(2)]
        status, headers, body = http_get(f"{w.api.base}/ready")
        assert status == 503 and headers["Retry-After"] == "5"
        assert json.loads(body)["reason"] == "the queue is full (2 jobs waiting, MAX_QUEUE=2)"
        assert probes(w) == {"health": 200, "ready": 503, "ping": 200}  # busy, not unhealthy
        status, headers, body = _post(w, "/run", with_steps(2))
        assert status == 429 and headers["Retry-After"] == "5" and "MAX_QUEUE" in json.loads(body)["error"]
        w.api.ok("POST", f"/cancel/{queued[0]}")
        assert probes(w) == READY
        w.api.ok("POST", f"/cancel/{running}")


def test_draining_is_not_ready_and_ping_says_unhealthy_while_health_stays_200(tmp_path: Path) -> None:
    write_models(tmp_path / "models", seed_models("001_request.json"))
    worker = ApiWorker(tmp_path, API_KEY=KEY, STANDIN_STEP_DELAY_S="0.05", SHUTDOWN_GRACE_S="30").start()
    try:
        running = worker.api.ok("POST", "/run", with_steps(40))["id"]  # 2 s of sampling
        worker.api.wait_status(running, ("IN_PROGRESS",))
        assert worker.proc is not None
        worker.proc.signal(signal.SIGTERM)
        wait_for(lambda: probes(worker)["ready"] == 503, 5, what="/ready to turn 503 on SIGTERM")
        assert probes(worker) == {"health": 200, "ready": 503, "ping": 503}
        status, headers, body = _post(worker, "/run", with_steps(2))
        assert status == 503 and headers["Retry-After"] == "5"
        reason = json.loads(http_get(f"{worker.api.base}/ready")[2])["reason"]
        assert "shutting down" in reason or reason.startswith("ComfyUI is stopping"), reason
        assert worker.proc.wait(40) == 0
        assert f"job {running} COMPLETED" in worker.log_text()
    finally:
        _stop(worker)


async def test_only_a_failed_supervisor_makes_health_503(tmp_path: Path) -> None:
    """The real supervisor (crash loop: the stand-in exits at every start) behind the real app, on a real port."""
    from supervisor.api.http_server import build_app
    from supervisor.api.job_service import JobService
    from supervisor.api.journal import Journal
    from supervisor.api.workflows import WorkflowLibrary
    from supervisor.jobs.engine import JobEngine
    from supervisor.metrics import WorkerMetrics

    env = worker_env(tmp_path, STANDIN_START_FAULT="exit:3", CRASH_LOOP_MAX="2", RESTART_BACKOFF_S="0.3",
                     RESTART_BACKOFF_MAX_S="0.3", STANDIN_START_DELAY_S="0.3")
    with running_supervisor(env) as sup:
        settings = sup.settings
        journal = await Journal.open(tmp_path / "jobs.sqlite3")
        engine = JobEngine(settings, sup)
        service = JobService(settings, sup, engine, journal, WorkflowLibrary.load(settings.workflows_dir),
                             WorkerMetrics())
        runner = web.AppRunner(build_app(service, settings))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                rounds: list[tuple[str, tuple[int, ...]]] = []
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    state = sup.status().state.value
                    answers = []
                    for probe in ("health", "ready", "ping"):
                        async with http.get(f"{base}/{probe}") as resp:
                            answers.append(resp.status)
                    if sup.status().state.value == state:  # no transition in between: the round is one state's
                        rounds.append((state, tuple(answers)))
                    if state == "failed":
                        break
                    await asyncio.sleep(0.02)
                async with http.get(f"{base}/health") as resp:
                    body = await resp.json()
            assert rounds[-1] == ("failed", (503, 503, 503)), rounds[-5:]
            initializing = {answers for state, answers in rounds if state in ("starting", "restarting")}
            assert initializing == {(200, 503, 204)}, rounds
            assert body["comfyui"]["state"] == "failed" and body["workers"]["unhealthy"] == 1
        finally:
            await runner.cleanup()
            await engine.close()
            await journal.close()


def _post(w: ApiWorker, path: str, body: Any) -> tuple[int, Any, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(w.api.base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _stop(worker: ApiWorker) -> None:
    if worker.proc is not None:
        worker.proc.shutdown()
