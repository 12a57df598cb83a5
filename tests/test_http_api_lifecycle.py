"""The self-hosted API across its life: restarts (the journal), SIGTERM, retention, refusal to start, failure.

Every test runs the real worker process; "killed" means SIGKILL of the worker and of ComfyUI's tree (what a
container's death does), never a polite stop.
"""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.api import ROOT, ApiWorker, seed, seed_models, write_models
from tests.helpers.worker import tree_processes, wait_for

pytestmark = pytest.mark.timeout(150)

SEED_001 = seed("001_request.json")


def with_steps(steps: int) -> dict[str, Any]:
    out = copy.deepcopy(SEED_001)
    out["input"]["workflow"]["31"]["inputs"]["steps"] = steps
    return out


def start(tmp_path: Path, port: int | None = None, log: str = "worker.log", **env: Any) -> ApiWorker:
    write_models(tmp_path / "models", seed_models("001_request.json"))
    worker = ApiWorker(tmp_path, log_name=log, STANDIN_STEP_DELAY_S="0.05", PROGRESS_INTERVAL_S="0", **env)
    if port is not None:
        worker.port = port
        worker.env["API_PORT"] = str(port)
        worker.api.base = f"http://127.0.0.1:{port}"
    return worker.start()


def kill_everything(worker: ApiWorker) -> None:
    """SIGKILL the worker and every process of its tree, like a container that dies."""
    assert worker.proc is not None
    worker.proc.signal(signal.SIGKILL)
    worker.proc.wait(10)
    for proc in tree_processes(worker.env["TEST_TREE_ID"]):
        proc.kill()
    wait_for(lambda: not tree_processes(worker.env["TEST_TREE_ID"]), 10, what="the tree to die")


def stop(worker: ApiWorker) -> int:
    assert worker.proc is not None
    if worker.proc.proc.poll() is None:
        worker.proc.signal(signal.SIGTERM)
    code = worker.proc.wait(40)
    worker.proc.cleanup()
    assert not tree_processes(worker.env["TEST_TREE_ID"])
    return code


def test_after_a_kill_queued_jobs_run_and_the_running_one_is_failed(tmp_path: Path) -> None:
    worker = start(tmp_path)
    try:
        running = worker.api.ok("POST", "/run", with_steps(400))["id"]
        worker.api.wait_status(running, ("IN_PROGRESS",))
        queued = [worker.api.ok("POST", "/run", with_steps(2))["id"] for _ in range(2)]
        done_before = worker.api.ok("GET", f"/status/{running}")
        assert done_before["status"] == "IN_PROGRESS"
        kill_everything(worker)

        again = start(tmp_path, port=worker.port, log="worker2.log")
        try:
            failed = again.api.ok("GET", f"/status/{running}")
            assert failed["status"] == "FAILED" and failed["error"] == "worker restarted while the job ran", failed
            for job in queued:
                body = again.api.wait_status(job, ("COMPLETED", "FAILED"), timeout=60)
                assert body["status"] == "COMPLETED", body
                assert body["output"]["images"]
            assert "2 job(s) queued before the restart are queued again" in again.log_text()
        finally:
            assert stop(again) == 0
    finally:
        if worker.proc and worker.proc.proc.poll() is None:
            kill_everything(worker)


def test_sigterm_finishes_the_running_job_keeps_the_queue_and_exits_0(tmp_path: Path) -> None:
    worker = start(tmp_path, SHUTDOWN_GRACE_S="30")
    running = worker.api.ok("POST", "/run", with_steps(40))["id"]  # 2 s of sampling
    worker.api.wait_status(running, ("IN_PROGRESS",))
    queued = worker.api.ok("POST", "/run", with_steps(2))["id"]
    assert worker.proc is not None
    worker.proc.signal(signal.SIGTERM)
    # while it drains: no new jobs, and the readiness probe says so (it is still alive: /health stays 200)
    status, body = worker.api.post("/run", with_steps(2))
    assert status == 503 and "shutting down" in body["error"], (status, body)
    assert worker.api.get("/ready")[0] == 503
    assert worker.api.get("/health")[0] == 200
    assert stop(worker) == 0
    log = worker.log_text()
    assert f"job {running} COMPLETED" in log and "1 queued job(s) kept in the journal for the next start" in log

    again = start(tmp_path, port=worker.port, log="worker2.log")
    try:
        assert again.api.ok("GET", f"/status/{running}")["status"] == "COMPLETED"
        streamed = again.api.ok("GET", f"/stream/{running}")  # the output once, then nothing: stream() ends
        assert streamed["status"] == "COMPLETED" and streamed["stream"][0]["output"]["images"]
        assert again.api.ok("GET", f"/stream/{running}")["stream"] == []
        assert again.api.wait_status(queued, ("COMPLETED",), timeout=60)["output"]["images"]
    finally:
        assert stop(again) == 0


def test_a_job_longer_than_the_grace_period_is_failed_saying_so(tmp_path: Path) -> None:
    worker = start(tmp_path, SHUTDOWN_GRACE_S="0.5")
    running = worker.api.ok("POST", "/run", with_steps(400))["id"]
    worker.api.wait_status(running, ("IN_PROGRESS",))
    assert stop(worker) == 0
    again = start(tmp_path, port=worker.port, log="worker2.log")
    try:
        body = again.api.ok("GET", f"/status/{running}")
        assert body["status"] == "FAILED"
        assert body["error"] == "the worker shut down before the job finished (SHUTDOWN_GRACE_S=0.5 s passed)"
    finally:
        assert stop(again) == 0


def test_finished_jobs_are_kept_for_the_retention_time(tmp_path: Path) -> None:
    worker = start(tmp_path, JOB_RETENTION_S="1")
    try:
        job = worker.api.ok("POST", "/runsync", with_steps(2))
        assert job["status"] == "COMPLETED"
        assert worker.api.get(f"/status/{job['id']}")[0] == 200
        wait_for(lambda: worker.api.get(f"/status/{job['id']}")[0] == 404, 10, what="the job to be purged")
    finally:
        assert stop(worker) == 0


def test_it_refuses_a_non_loopback_address_without_a_key(tmp_path: Path) -> None:
    env = ApiWorker(tmp_path, API_HOST="0.0.0.0").env
    proc = subprocess.run([sys.executable, "-m", "supervisor"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve the API on 0.0.0.0" in proc.stderr and "API_KEY" in proc.stderr
    assert not tree_processes(env["TEST_TREE_ID"])  # ComfyUI was never started


def test_a_failed_supervisor_exits_1_and_keeps_the_queue(tmp_path: Path) -> None:
    worker = ApiWorker(tmp_path, STANDIN_START_FAULT="exit:3", CRASH_LOOP_MAX="3", RESTART_BACKOFF_S="0.5",
                       RESTART_BACKOFF_MAX_S="0.5")
    worker.start(wait=False)
    assert worker.proc is not None
    job = wait_for(lambda: _try_post(worker), 20, interval=0.01, what="the API to accept a job")
    assert worker.proc.wait(60) == 1
    assert "exiting: ComfyUI failed 3 times" in worker.log_text()
    assert not tree_processes(worker.env["TEST_TREE_ID"])
    from supervisor.api.journal import Journal
    import asyncio

    async def read() -> Any:
        journal = await Journal.open(tmp_path / "data" / "jobs.sqlite3")
        try:
            return await journal.get(job)
        finally:
            await journal.close()

    assert asyncio.run(read()).status == "IN_QUEUE"  # kept for the next start


def _try_post(worker: ApiWorker) -> str | None:
    try:
        status, body = worker.api.post("/run", with_steps(2), timeout=2)
    except OSError:
        return None
    return body["id"] if status == 200 else None


def test_max_concurrency_runs_that_many_jobs_at_once(tmp_path: Path) -> None:
    worker = start(tmp_path, MAX_CONCURRENCY="2")
    try:
        jobs = [worker.api.ok("POST", "/run", with_steps(60))["id"] for _ in range(3)]
        wait_for(lambda: [worker.api.ok("GET", f"/status/{j}")["status"] for j in jobs]
                 == ["IN_PROGRESS", "IN_PROGRESS", "IN_QUEUE"], 20, what="two jobs running, one queued")
        health = worker.api.ok("GET", "/health")
        assert health["workers"] == {**health["workers"], "running": 2, "idle": 0}
        assert health["jobs"]["inProgress"] == 2 and health["jobs"]["inQueue"] == 1
        for job in jobs:
            assert worker.api.wait_status(job, ("COMPLETED",), timeout=60)["output"]["images"]
    finally:
        assert stop(worker) == 0
