"""The job engine when things go wrong: deadlines, cancellation, crashes, node failures, dropped websockets.

Every test runs a real ComfySupervisor over the stand-in, with the stand-in's fault knobs set in its
environment; the engine is the production code, unmodified.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import signal
import time
from typing import Any

import pytest

from supervisor.errors import ComfyUnavailableError, ExecutionError, JobError, JobTimeoutError
from supervisor.jobs.engine import JobEngine
from supervisor.jobs.job import JobResult
from tests.helpers.jobs import ProxiedHandle, Rig, TcpProxy, seed_body, seed_models, supervisor_rig

MODELS = seed_models("001_request.json")


def flux(seed: int, steps: int = 20) -> dict[str, Any]:
    graph = copy.deepcopy(seed_body("001_request.json")["input"]["workflow"])
    graph["31"]["inputs"].update(seed=seed, steps=steps)
    return graph


async def run(engine: JobEngine, body: Any, job_id: str = "job") -> JobResult:
    return await engine.run_job(job_id, body)


async def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def queue_ids(rig: Rig) -> tuple[list[str], list[str]]:
    q = rig.comfy_get("/queue")
    return [i[1] for i in q["queue_running"]], [i[1] for i in q["queue_pending"]]


@pytest.fixture(scope="module")
def slow_rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    """Sampler steps of 0.2 s: a 20-step job takes 4 s."""
    with supervisor_rig(tmp_path_factory.mktemp("slow"), models=MODELS, STANDIN_STEP_DELAY_S="0.2") as r:
        yield r


# --- deadline and cancellation ----------------------------------------------------------------------------


async def test_deadline_interrupts_the_running_prompt_and_the_next_job_runs(slow_rig: Rig) -> None:
    engine = slow_rig.engine()
    try:
        started = time.monotonic()
        with pytest.raises(JobTimeoutError) as info:
            await run(engine, {"workflow": flux(1), "timeout_s": 1})
        elapsed = time.monotonic() - started
        assert info.value.message == "Job timed out after 1 s while running node 31 (KSampler)"
        assert info.value.kind == "timeout"
        assert elapsed < 3.5, elapsed  # interrupted at the next sampler step, not run to its 4 s end
        assert queue_ids(slow_rig) == ([], [])
        history = slow_rig.comfy_get(f"/history/{info.value.details['prompt_id']}")
        assert history[info.value.details["prompt_id"]]["status"]["status_str"] == "error"  # interrupted
        result = await run(engine, {"workflow": flux(2, steps=2), "timeout_s": 30})
        assert [o.filename for o in result.outputs] == ["ComfyUI_00001_.png"]
    finally:
        await engine.close()
    assert slow_rig.job_files() == []


async def test_deadline_while_queued_deletes_the_prompt(slow_rig: Rig) -> None:
    engine = slow_rig.engine()
    try:
        blocker = asyncio.create_task(run(engine, {"workflow": flux(3), "timeout_s": 30}, "blocker"))
        await wait_until(lambda: queue_ids(slow_rig)[0], what="the blocker to run")
        with pytest.raises(JobTimeoutError) as info:
            await run(engine, {"workflow": flux(4), "timeout_s": 1}, "queued")
        assert info.value.message == "Job timed out after 1 s while waiting in ComfyUI's queue"
        running, pending = queue_ids(slow_rig)
        assert pending == [] and info.value.details["prompt_id"] not in running
        blocker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocker
        assert queue_ids(slow_rig) == ([], [])
        assert slow_rig.comfy_get(f"/history/{info.value.details['prompt_id']}") == {}  # it never ran
    finally:
        await engine.close()
    assert slow_rig.job_files() == []


async def test_cancelled_while_queued_is_removed_from_the_queue_and_returns_nothing(slow_rig: Rig) -> None:
    engine = slow_rig.engine()
    try:
        first = asyncio.create_task(run(engine, {"workflow": flux(5)}, "first"))
        running = await wait_until(lambda: queue_ids(slow_rig)[0], what="the first job to run")
        second = asyncio.create_task(run(engine, {"workflow": flux(6)}, "second"))
        pending = await wait_until(lambda: queue_ids(slow_rig)[1], what="the second job to queue")
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert queue_ids(slow_rig) == (running, [])
        first.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert time.monotonic() - started < 3.0  # interrupted at a sampler step, not run to its end
        assert queue_ids(slow_rig) == ([], [])
        assert slow_rig.comfy_get(f"/history/{pending[0]}") == {}
        result = await run(engine, {"workflow": flux(7, steps=2)})
        assert len(result.outputs) == 1
    finally:
        await engine.close()
    assert slow_rig.job_files() == []


# --- ComfyUI dying or failing ------------------------------------------------------------------------------


async def test_kill_9_mid_job_fails_at_once_with_the_exit_and_the_log(tmp_path) -> None:
    with supervisor_rig(tmp_path, models=MODELS, STANDIN_STEP_DELAY_S="0.2") as rig:
        engine = rig.engine()
        try:
            task = asyncio.create_task(run(engine, {"workflow": flux(8)}))
            await wait_until(lambda: queue_ids(rig)[0], what="the job to run")
            await asyncio.sleep(0.3)
            pid = rig.sup.status().pid
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(ComfyUnavailableError) as info:
                await task
            assert time.monotonic() - killed < 3.0  # at once, not after reconnect attempts or the deadline
            assert info.value.message == (
                f"ComfyUI stopped while running node 31 (KSampler): ComfyUI (pid {pid}) was killed by signal 9 (SIGKILL)")
            assert info.value.details["signal"] == 9
            assert "[standin] serving since" in "\n".join(info.value.details["log_tail"])
            assert "ComfyUI's last log lines:" in info.value.describe()
            assert rig.job_files() == []
            await wait_until(lambda: rig.sup.status().state.serving and rig.sup.status().pid != pid, timeout=20,
                             what="the restart")
            before = len(rig.requests())
            result = await run(engine, {"workflow": flux(9, steps=2)})  # the next job runs on the new process
            assert len(result.outputs) == 1
            # the new process's catalogue was fetched: the old one may describe other nodes
            assert [r["path"] for r in rig.requests()[before:]].count("/object_info") == 1
        finally:
            await engine.close()


async def test_node_exit_fails_the_job_with_exit_code_and_traceback(tmp_path) -> None:
    with supervisor_rig(tmp_path, models=MODELS, STANDIN_NODE_FAULT="KSampler:exit:3", STANDIN_NODE_DELAY_S="0.1") as rig:
        engine = rig.engine()
        try:
            pid = rig.sup.status().pid
            with pytest.raises(ComfyUnavailableError) as info:
                await run(engine, {"workflow": flux(10)})
        finally:
            await engine.close()
        # the stand-in exits as the node starts, so the last event that reached us may name an earlier node
        assert re.fullmatch(rf"ComfyUI stopped while running node (31 \(KSampler\)|6 \(CLIPTextEncode\)|33 "
                            rf"\(CLIPTextEncode\)|27 \(EmptyLatentImage\)|30 \(CheckpointLoaderSimple\)): ComfyUI "
                            rf"\(pid {pid}\) exited with code 3", info.value.message), info.value.message
        assert info.value.details["exit_code"] == 3
        assert any(line.startswith("RuntimeError:") for line in info.value.details["log_tail"])
        assert rig.job_files() == []


async def test_a_hung_comfyui_is_killed_by_the_supervisor_and_the_job_fails_at_once(tmp_path) -> None:
    with supervisor_rig(tmp_path, models=MODELS, STANDIN_NODE_FAULT="VAEDecode:hang", STANDIN_NODE_DELAY_S="0.05",
                        HEALTH_INTERVAL_S="0.3", HEALTH_TIMEOUT_S="0.5", HEALTH_FAILURES="2") as rig:
        engine = rig.engine()
        try:
            pid = rig.sup.status().pid
            started = time.monotonic()
            with pytest.raises(ComfyUnavailableError) as info:
                await run(engine, {"workflow": flux(15, steps=2), "timeout_s": 60})
            assert time.monotonic() - started < 10
        finally:
            await engine.close()
        assert re.fullmatch(rf"ComfyUI stopped while running node \d+ \(\w+\): ComfyUI \(pid {pid}\) stopped "
                            r"answering and was killed", info.value.message), info.value.message
        assert rig.job_files() == []


@pytest.fixture(scope="module")
def failing_rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    with supervisor_rig(tmp_path_factory.mktemp("faults"), models=MODELS,
                        STANDIN_NODE_FAULT="31:oom,VAEDecode:error:decoder exploded: bad latent") as r:
        yield r


async def test_cuda_oom_names_the_node_and_what_to_reduce(failing_rig: Rig) -> None:
    engine = failing_rig.engine()
    try:
        with pytest.raises(ExecutionError) as info:
            await run(engine, {"workflow": flux(11)})
    finally:
        await engine.close()
    message = info.value.message
    assert message.startswith("Workflow execution error: node 31 (KSampler) raised torch.OutOfMemoryError: CUDA out "
                              "of memory. Tried to allocate 20.00 MiB.")
    assert message.endswith("; ComfyUI ran out of memory: reduce the image size (width/height), the batch size or "
                            "the number of frames, or use a GPU with more memory")
    assert "This error means" not in message and "\n" not in message
    assert info.value.details["node_type"] == "KSampler"
    assert failing_rig.job_files() == []


async def test_execution_error_names_node_type_exception_and_message(failing_rig: Rig) -> None:
    graph = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev-fp8.safetensors"}},
             "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 2]}},
             "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}}
    graph["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}  # runs (and writes) before the error
    graph["6"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 9}}
    engine = failing_rig.engine()
    try:
        with pytest.raises(ExecutionError) as info:
            await run(engine, {"workflow": graph})
    finally:
        await engine.close()
    assert info.value.message == (
        "Workflow execution error: node 3 (VAEDecode) raised Exception: decoder exploded: bad latent")
    assert info.value.kind == "execution"
    assert failing_rig.job_files() == []


# --- the websocket ----------------------------------------------------------------------------------------


async def test_a_dropped_websocket_is_reopened_and_the_job_completes(slow_rig: Rig) -> None:
    proxy = await TcpProxy(slow_rig.settings.comfyui_port).start()
    engine = JobEngine(slow_rig.settings, ProxiedHandle(slow_rig.sup, proxy.url))
    try:
        task = asyncio.create_task(run(engine, {"workflow": flux(12, steps=8)}))
        await wait_until(lambda: queue_ids(slow_rig)[0], what="the job to run")
        await asyncio.sleep(0.3)
        connections = proxy.connections
        proxy.drop()  # the websocket sees an abnormal close; ComfyUI keeps running the prompt
        result = await task
        assert [o.filename for o in result.outputs] == ["ComfyUI_00001_.png"]
        assert proxy.connections > connections  # it did reconnect
    finally:
        await engine.close()
        await proxy.stop()
    assert slow_rig.job_files() == []


async def test_a_websocket_that_cannot_be_reopened_fails_the_job_clearly(slow_rig: Rig) -> None:
    proxy = await TcpProxy(slow_rig.settings.comfyui_port).start()
    engine = JobEngine(slow_rig.settings, ProxiedHandle(slow_rig.sup, proxy.url))
    try:
        task = asyncio.create_task(run(engine, {"workflow": flux(13, steps=4)}))
        await wait_until(lambda: queue_ids(slow_rig)[0], what="the job to run")
        proxy.refuse = True
        proxy.drop()
        with pytest.raises(ComfyUnavailableError) as info:
            await task
        assert re.fullmatch(
            rf"ComfyUI server \(127\.0\.0\.1:{proxy.port}\) not reachable: the websocket dropped and 3 reconnection "
            r"attempts failed \(the websocket could not be opened: .+\)", info.value.message), info.value.message
        # the prompt still runs in ComfyUI: its folders go only once ComfyUI is reachable and done with it
        assert slow_rig.job_files() != [] or queue_ids(slow_rig)[0]
        proxy.refuse = False
        await wait_until(lambda: queue_ids(slow_rig) == ([], []) and not slow_rig.job_files(), timeout=15,
                         what="the abandoned prompt to finish and its folders to be removed")
    finally:
        await engine.close()
        await proxy.stop()


async def test_comfyui_unavailable_when_the_supervisor_is_stopped(tmp_path) -> None:
    with supervisor_rig(tmp_path, models=MODELS) as rig:
        port = rig.settings.comfyui_port
        await asyncio.to_thread(rig.sup.stop)
        engine = rig.engine()
        try:
            with pytest.raises(JobError) as info:
                await run(engine, {"workflow": flux(14)})
        finally:
            await engine.close()
    assert info.value.kind == "comfy_unavailable"
    assert info.value.message.startswith(f"ComfyUI server (127.0.0.1:{port}) not reachable: the supervisor is not "
                                         "serving (")
