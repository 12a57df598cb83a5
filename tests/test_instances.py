"""COMFYUI_INSTANCES: several supervised ComfyUI processes behind one worker, fed by one queue.

Real processes throughout: ``python -m supervisor`` with two (or three) stand-in ComfyUIs, driven over HTTP;
crashes are real ``kill -9``s; each instance's environment is read from the live process (psutil).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers.api import ApiWorker, api_worker, http_get, seed_001_with_steps, seed_models, write_models
from tests.helpers.standin import free_port_run
from tests.helpers.worker import tree_processes, wait_for

pytestmark = pytest.mark.timeout(180)

with_steps = seed_001_with_steps


def instances_env(tmp_path: Path, count: int, **env: Any) -> dict[str, Any]:
    """A worker with ``count`` instances: COMFYUI_PORT .. COMFYUI_PORT+count-1 free, the API's port elsewhere."""
    write_models(tmp_path / "models", seed_models("001_request.json"))
    return {"COMFYUI_PORT": str(free_port_run(count)), "STANDIN_STEP_DELAY_S": "0.02", "PROGRESS_INTERVAL_S": "0",
            "METRICS_PUBLIC": "true", "RESTART_BACKOFF_S": "0.2", **env}


def health(w: ApiWorker) -> dict[str, Any]:
    status, body = w.api.get("/health")
    assert status == 200, body
    return body


def run_jobs(w: ApiWorker, count: int, steps: int = 1) -> list[str]:
    ids = [w.api.ok("POST", "/run", with_steps(steps))["id"] for _ in range(count)]
    return ids


def finished(w: ApiWorker, ids: list[str], timeout: float = 90) -> dict[str, dict[str, Any]]:
    bodies: dict[str, dict[str, Any]] = {}
    for job_id in ids:
        bodies[job_id] = w.api.wait_status(job_id, ("COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"), timeout)
    return bodies


def instance_of_jobs(log: str) -> dict[str, str]:
    """job id -> the instance it started on, from the worker's log ("job X started on ComfyUI instance N")."""
    return dict(re.findall(r"job (\S+) started on ComfyUI instance (\d+)", log))


def test_two_instances_share_one_queue_survive_a_kill_and_stop_cleanly(tmp_path: Path) -> None:
    env = instances_env(tmp_path, 2, COMFYUI_INSTANCES="2")
    with api_worker(tmp_path, **env) as w:
        wait_for(lambda: all(i["state"] == "ready" for i in health(w)["instances"]), 30, what="both instances ready")
        body = health(w)
        assert [i["instance"] for i in body["instances"]] == ["0", "1"]
        assert [i["port"] for i in body["instances"]] == [int(env["COMFYUI_PORT"]), int(env["COMFYUI_PORT"]) + 1]
        assert body["comfyui"]["state"] == "ready" and body["workers"]["idle"] == 2  # MAX_CONCURRENCY = 2
        pids = [i["pid"] for i in body["instances"]]
        assert len(set(pids)) == 2 and all(pids)
        for inst in body["instances"]:  # each its own folders under DATA_DIR, its own GPU
            proc = psutil.Process(inst["pid"])
            assert proc.environ()["CUDA_VISIBLE_DEVICES"] == inst["instance"] == inst["gpu"]
            own = Path(w.env["DATA_DIR"]) / f"instance-{inst['instance']}"
            argv = proc.cmdline()
            assert argv[argv.index("--user-directory") + 1] == str(own / "user"), argv

        # 1. forty small jobs through one queue: both instances do a fair share
        ids = run_jobs(w, 40)
        results = finished(w, ids)
        assert all(b["status"] == "COMPLETED" for b in results.values()), [b for b in results.values()
                                                                          if b["status"] != "COMPLETED"][:2]
        done = [i["jobs"]["completed"] for i in health(w)["instances"]]
        assert sum(done) == 40 and min(done) >= 10, done
        _, _, metrics = http_get(f"{w.api.base}/metrics")
        text = metrics.decode()
        for label in ("0", "1"):
            assert f'comfyui_worker_comfyui_ready{{instance="{label}"}} 1.0' in text

        # 2. kill -9 one instance while both run a job: only its own job fails; the other keeps completing
        long_ids = run_jobs(w, 2, steps=150)  # ~3 s each
        wait_for(lambda: [i["jobs"]["inProgress"] for i in health(w)["instances"]] == [1, 1], 20,
                 what="one job running on each instance")
        victim = health(w)["instances"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        more = run_jobs(w, 4)
        results = finished(w, long_ids + more)
        on = instance_of_jobs(w.log_text())
        failed = [j for j, b in results.items() if b["status"] != "COMPLETED"]
        assert len(failed) <= 1 and all(on[j] == "1" for j in failed), (failed, on, results)
        if failed:
            assert "signal 9" in results[failed[0]]["error"], results[failed[0]]["error"]
        assert all(results[j]["status"] == "COMPLETED" for j in long_ids if on[j] == "0")
        assert all(results[j]["status"] == "COMPLETED" for j in more)

        # 3. the killed instance comes back (a new process) and takes jobs again
        back = wait_for(lambda: (i := health(w)["instances"][1])["state"] == "ready" and i["restarts"] >= 1 and i,
                        30, what="instance 1 restarted and ready")
        assert back["pid"] != victim["pid"] and health(w)["instances"][0]["restarts"] == 0
        before = health(w)["instances"][1]["jobs"]["completed"]
        finished(w, run_jobs(w, 6))
        assert health(w)["instances"][1]["jobs"]["completed"] > before
        tree = [psutil.Process(i["pid"]) for i in health(w)["instances"]]

        # 4. SIGTERM stops both trees, nothing left (api_worker also checks the whole tree by its marker)
        assert w.proc is not None
        w.proc.signal(signal.SIGTERM)
        assert w.proc.wait(40) == 0
        _, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive and not tree_processes(w.env["TEST_TREE_ID"])


def fake_nvidia_smi(folder: Path, gpus: int) -> Path:
    """An ``nvidia-smi`` that answers ``-L`` like the real one on a box with ``gpus`` GPUs."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    lines = "\n".join(f"GPU {i}: NVIDIA L4 (UUID: GPU-{i:08d}-aaaa-bbbb-cccc-000000000000)" for i in range(gpus))
    script.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 9\ncat <<'EOF'\n{lines}\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def test_auto_starts_one_instance_per_gpu_nvidia_smi_lists(tmp_path: Path) -> None:
    bin_dir = fake_nvidia_smi(tmp_path / "bin", 3)
    env = instances_env(tmp_path, 3, COMFYUI_INSTANCES="auto", PATH=f"{bin_dir}:{os.environ['PATH']}")
    w = ApiWorker(tmp_path, **env)
    w.env.pop("CUDA_VISIBLE_DEVICES", None)  # else auto would take the GPUs it names
    try:
        w.start()
        wait_for(lambda: all(i["state"] == "ready" for i in health(w)["instances"]), 30, what="three instances")
        instances = health(w)["instances"]
        assert len(instances) == 3
        seen = [psutil.Process(i["pid"]).environ()["CUDA_VISIBLE_DEVICES"] for i in instances]
        assert seen == ["0", "1", "2"] and [i["gpu"] for i in instances] == seen
        for i in instances:  # each stand-in answers on its own port
            status, _, _ = http_get(f"http://127.0.0.1:{i['port']}/system_stats")
            assert status == 200
        assert "3 ComfyUI instance(s): COMFYUI_INSTANCES=auto: 3 GPU(s) from nvidia-smi -L: 0, 1, 2" in w.log_text()
    finally:
        if w.proc is not None:
            w.proc.shutdown()


def test_a_taken_port_of_a_later_instance_stops_start_up(tmp_path: Path) -> None:
    import socket

    env = instances_env(tmp_path, 2, COMFYUI_INSTANCES="2")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(env["COMFYUI_PORT"]) + 1))
        holder.listen()
        worker = ApiWorker(tmp_path, **env).start(wait=False)
        assert worker.proc is not None
        assert worker.proc.wait(30) == 2
    text = worker.log_text()
    assert f"port {int(env['COMFYUI_PORT']) + 1} on 127.0.0.1 (COMFYUI_PORT+1, ComfyUI instance 1) is already in use" \
        in text, text
    time.sleep(0.1)
    assert not tree_processes(worker.env["TEST_TREE_ID"])


def test_the_runpod_handler_runs_jobs_on_every_instance(tmp_path: Path) -> None:
    """RunPod's queue mode, the unmodified SDK loop: its concurrency is the pool's (2), each job on a free instance."""
    from tests.test_runpod_worker import runpod_worker

    port = free_port_run(2)
    with runpod_worker(tmp_path, COMFYUI_INSTANCES="2", COMFYUI_PORT=str(port),
                       STANDIN_STEP_DELAY_S="0.02") as (rp, worker):
        rp.wait_for(lambda: any(t["route"] == "job-take-batch" for t in rp.takes), 30, "a batch take")
        jobs = [rp.enqueue(with_steps(40)["input"]) for _ in range(6)]
        results = [rp.wait_result(job, timeout=60) for job in jobs]
        assert all("output" in r for r in results), results
        on = instance_of_jobs(worker.log_text())
        assert sorted(on) == sorted(jobs) and set(on.values()) == {"0", "1"}, on
        assert "concurrency 2; 2 ComfyUI instance(s)" in worker.log_text()
        assert any(t["query"]["batch_size"][0] == "2" for t in rp.takes if t["route"] == "job-take-batch")


async def test_an_instance_that_fails_for_good_leaves_the_others_serving(tmp_path: Path) -> None:
    """Instance 1 cannot bind its port (a foreign listener holds it): its crash-loop breaker trips; the worker's
    status stays ready, jobs are only handed instance 0, and the worker is not finished."""
    import asyncio
    import socket

    from supervisor.jobs.dispatch import InstanceDispatcher
    from supervisor.supervision.pool import ComfyPool
    from tests.helpers.worker import settings_for, worker_env

    env = worker_env(tmp_path, COMFYUI_INSTANCES="2", COMFYUI_PORT=str(free_port_run(2)), CRASH_LOOP_MAX="2",
                     RESTART_BACKOFF_S="0.1", RESTART_BACKOFF_MAX_S="0.1", HEALTH_TIMEOUT_S="0.2")
    settings = settings_for(env)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", settings.comfyui_port + 1))
        holder.listen()
        pool = ComfyPool(settings)
        pool.start()
        dispatcher = InstanceDispatcher.for_handles(settings, pool.instances)
        try:
            await asyncio.to_thread(wait_for, lambda: [s.status().state.value for s in pool.instances]
                                    == ["ready", "failed"], 60, 0.05, "instance 0 ready, instance 1 failed")
            status = pool.status()
            assert status.state.value == "ready" and status.message.startswith("1 of 2 ComfyUI instances serving")
            assert not pool.wait_finished(0.1)
            first = await dispatcher.claim(1.0)
            assert first.label == "0"
            with pytest.raises(TimeoutError, match=r"no ComfyUI instance was free and ready within 0.3 s "
                                                   r"\(0: ready, busy, 1: failed\)"):
                await dispatcher.claim(0.3)
            dispatcher.release(first, "COMPLETED")
            assert (await dispatcher.claim(1.0)).label == "0"
            state = json.loads(Path(env["STATE_FILE"]).read_text())
            assert state["state"] == "ready" and [i["state"] for i in state["instances"]] == ["ready", "failed"]
        finally:
            await dispatcher.close()
            await asyncio.to_thread(pool.stop)
    assert not tree_processes(env["TEST_TREE_ID"])
