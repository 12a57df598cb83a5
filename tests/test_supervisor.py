"""The supervisor against the stand-in ComfyUI as a real process: readiness, crash, hang, crash loop, stop.

Nothing of the supervisor is mocked; faults are injected into the stand-in through its environment, which
the worker passes on to ComfyUI like any other variable. Time bounds are generous: the benchmark measures.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from supervisor.comfy.status import State
from tests.helpers.comfy_targets import ComfyTarget
from tests.helpers.worker import (
    STANDIN,
    WorkerProcess,
    running_supervisor,
    tree_processes,
    wait_for,
    worker_env,
)

SERVING_RE = re.compile(r"\[standin\] serving since (\d+\.\d+)")


def _ready_at(sup) -> dict:
    """Record the wall-clock time of each state change (listener runs on the supervisor thread)."""
    seen: dict = {}
    sup.add_listener(lambda st: seen.setdefault(st.state.value, time.time()))
    return seen


class FirstAnswer:
    """An independent prober: the wall-clock time ComfyUI first answers ``GET /system_stats`` with 200,
    polled every 10 ms from its own thread (what the supervisor's readiness is measured against)."""

    def __init__(self, url: str) -> None:
        self.url, self.at = url, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=1) as resp:
                    if resp.status == 200:
                        self.at = time.time()
                        return
            except OSError:
                pass
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


async def test_ready_follows_the_first_200_closely(tmp_path: Path, comfy: ComfyTarget) -> None:
    env = worker_env(tmp_path, **comfy.env)
    seen: dict = {}
    prober = FirstAnswer(f"http://127.0.0.1:{env['COMFYUI_PORT']}")
    try:
        with running_supervisor(env, [lambda st: seen.setdefault(st.state.value, time.time())]) as sup:
            status = await sup.wait_ready(comfy.start_timeout_s)
            assert status.state is State.READY
            assert status.pid and status.generation == 1 and status.restarts == 0
            wait_for(lambda: prober.at, 5, what="the prober's first 200")
            # either may see the first 200 first (both poll); ready must not lag it by a second
            assert -0.5 < seen["ready"] - prober.at < 1.0, (seen["ready"], prober.at)
    finally:
        prober.stop()


async def test_ready_follows_the_standins_serving_line_closely(tmp_path: Path) -> None:
    env = worker_env(tmp_path)
    seen: dict = {}
    with running_supervisor(env, [lambda st: seen.setdefault(st.state.value, time.time())]) as sup:
        await sup.wait_ready(30)
        match = wait_for(lambda: SERVING_RE.search("\n".join(sup.log_tail(200))), 5, what="serving line")
        assert 0 <= seen["ready"] - float(match.group(1)) < 1.0, (seen["ready"], match.group(1))


async def test_kill_9_is_noticed_at_once_and_restarted(tmp_path: Path, comfy: ComfyTarget) -> None:
    env = worker_env(tmp_path, **comfy.env)
    with running_supervisor(env) as sup:
        first = await sup.wait_ready(comfy.start_timeout_s)
        watcher = asyncio.ensure_future(sup.wait_exit(first.generation))
        killed_at = time.monotonic()
        os.kill(first.pid, signal.SIGKILL)
        crash = await asyncio.wait_for(watcher, 5)
        noticed = time.monotonic() - killed_at
        assert noticed < 1.0
        assert crash.signal == 9 and crash.exit_code is None and crash.pid == first.pid
        assert "SIGKILL" in crash.describe()
        assert any("To see the GUI go to" in line for line in crash.last_lines), crash.last_lines
        again = await sup.wait_ready(comfy.start_timeout_s)
        assert again.generation == first.generation + 1
        assert again.restarts == first.restarts + 1
        assert again.pid != first.pid
        assert again.last_exit is not None and again.last_exit.signal == 9


async def test_sigstop_is_declared_hung_killed_and_restarted(tmp_path: Path, comfy: ComfyTarget) -> None:
    interval, failures, timeout = 0.2, 3, 0.3
    env = worker_env(tmp_path, HEALTH_INTERVAL_S=interval, HEALTH_FAILURES=failures, HEALTH_TIMEOUT_S=timeout,
                     **comfy.env)
    with running_supervisor(env) as sup:
        first = await sup.wait_ready(comfy.start_timeout_s)
        seen = _ready_at(sup)
        stopped_at = time.time()
        os.kill(first.pid, signal.SIGSTOP)
        crash = await asyncio.wait_for(sup.wait_exit(first.generation), 20)
        killed = time.time() - stopped_at
        declared = seen["restarting"] - stopped_at
        assert crash.reason == "killed as hung" and crash.signal in (signal.SIGTERM, signal.SIGKILL)
        # each probe waits the interval, then up to the timeout: the bound is (interval + timeout) x failures
        assert declared <= (interval + timeout) * failures + 1.0, declared
        assert killed <= declared + 2.0, (killed, declared)
        again = await sup.wait_ready(comfy.start_timeout_s)
        assert again.generation == first.generation + 1 and again.restarts == 1


def test_failing_start_ends_in_failed_and_the_worker_exits_non_zero(tmp_path: Path) -> None:
    env = worker_env(
        tmp_path,
        STANDIN_START_FAULT="exit:3",
        STANDIN_SPAWN_GRANDCHILD="1",
        CRASH_LOOP_MAX=3,
        RESTART_BACKOFF_S=0.05,
        RESTART_BACKOFF_MAX_S=0.1,
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        code = worker.wait(60)
        log = worker.log_text()
        assert code == 1, log
        assert "ComfyUI failed 3 times within" in log
        assert "exited with code 3" in log
        state = worker.state()
        assert state and state["state"] == "failed" and state["restarts"] == 2
        assert tree_processes(env["TEST_TREE_ID"]) == []
    finally:
        worker.cleanup()


def test_a_comfyui_that_dies_at_every_start_ends_in_failed(tmp_path: Path, comfy: ComfyTarget) -> None:
    """A crash loop without a fault knob: a bad flag in COMFYUI_ARGS makes ComfyUI's own argparse exit 2."""
    env = worker_env(tmp_path, COMFYUI_ARGS="--cpu --port not-a-port", CRASH_LOOP_MAX=3, RESTART_BACKOFF_S=0.05,
                     RESTART_BACKOFF_MAX_S=0.1, **comfy.env)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        code = worker.wait(comfy.start_timeout_s * 2)
        log = worker.log_text()
        assert code == 1, log
        assert "ComfyUI failed 3 times within" in log and "exited with code 2" in log, log
        assert "argument --port: invalid int value: 'not-a-port'" in log, log
        state = worker.state()
        assert state and state["state"] == "failed" and state["restarts"] == 2
        assert tree_processes(env["TEST_TREE_ID"]) == []
    finally:
        worker.cleanup()


def test_backoff_first_restart_immediate_then_growing(tmp_path: Path) -> None:
    env = worker_env(
        tmp_path, STANDIN_START_FAULT="exit:1", CRASH_LOOP_MAX=4, RESTART_BACKOFF_S=0.5, RESTART_BACKOFF_MAX_S=0.8
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        assert worker.wait(60) == 1
        delays = re.findall(r"restarting in ([\d.]+) s \(failure (\d) of 4\)", worker.log_text())
        assert delays == [("0", "1"), ("0.5", "2"), ("0.8", "3")], delays
    finally:
        worker.cleanup()


async def test_import_failed_pack_makes_it_degraded_naming_the_classes(tmp_path: Path) -> None:
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(STANDIN, comfy, ignore=shutil.ignore_patterns("__pycache__"))
    pack = comfy / "custom_nodes" / "broken_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(
        "import no_such_module_xyz\n"
        "class BrokenNode:\n    pass\n"
        "NODE_CLASS_MAPPINGS = {'BrokenNode': BrokenNode}\n"
    )
    env = worker_env(tmp_path, COMFYUI_DIR=comfy, REQUIRED_NODES="BrokenNode, SaveImage,EmptyImage")
    with running_supervisor(env) as sup:
        status = await sup.wait_ready(30)
        assert status.state is State.DEGRADED
        assert status.missing_classes == ("BrokenNode",)
        assert any("IMPORT FAILED" in line and "broken_pack" in line for line in status.import_failures)
        assert any("no_such_module_xyz" in line for line in status.import_failures), status.import_failures
        assert "missing node classes: BrokenNode" in status.message


async def test_required_classes_come_from_the_named_workflows(tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "t.json").write_text(
        '{"workflow": {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "NoSuchNode", "inputs": {}}}}'
    )
    env = worker_env(tmp_path, WORKFLOWS_DIR=workflows)
    with running_supervisor(env) as sup:
        status = await sup.wait_ready(30)
        assert status.state is State.DEGRADED and status.missing_classes == ("NoSuchNode",)


@pytest.mark.parametrize("how", ["stop", "restart"])
async def test_grandchild_ignoring_sigterm_never_survives(tmp_path: Path, how: str) -> None:
    env = worker_env(tmp_path, STANDIN_SPAWN_GRANDCHILD="1")
    with running_supervisor(env) as sup:
        first = await sup.wait_ready(30)
        # ComfyUI's own descendants (in fork mode the launcher's parent is in the tree too, and outlives a restart)
        grandchild = wait_for(lambda: psutil.Process(first.pid).children(recursive=True), 10, what="the grandchild")
        assert grandchild
        if how == "restart":
            os.kill(first.pid, signal.SIGKILL)
            await asyncio.wait_for(sup.wait_exit(first.generation), 10)
            wait_for(lambda: not any(p.is_running() for p in grandchild), 10, what="grandchild killed on restart")
            await sup.wait_ready(30)
    # running_supervisor asserts that nothing of the tree is left after stop


def test_sigterm_exits_0_leaves_nothing_and_keeps_data_under_data_dir(tmp_path: Path, comfy: ComfyTarget) -> None:
    # the stand-in also spawns a grandchild that ignores SIGTERM (the real ComfyUI ignores the variable)
    env = worker_env(tmp_path, STANDIN_SPAWN_GRANDCHILD="1", **comfy.env)
    before = _tree_entries(comfy.comfyui_dir)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_state("ready", comfy.start_timeout_s)
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.log_text()
        assert tree_processes(env["TEST_TREE_ID"]) == []
        data = Path(env["DATA_DIR"])
        assert (data / "user" / "comfyui.db").is_file()
        for sub in ("input", "output", "user"):
            assert (data / sub).is_dir()
        assert (data / "extra_model_paths.yaml").is_file()
        assert _tree_entries(comfy.comfyui_dir) == before, "ComfyUI wrote into its own source tree"
    finally:
        worker.cleanup()


def _tree_entries(root: Path) -> set[str]:
    """The top of a ComfyUI tree, without Python's byte-code caches."""
    return {p.name for p in root.iterdir() if p.name != "__pycache__"}


def test_missing_main_py_is_a_clear_start_up_error(tmp_path: Path) -> None:
    env = worker_env(tmp_path, COMFYUI_DIR=tmp_path / "nowhere")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        assert worker.wait(30) == 1
        assert "has no main.py; set COMFYUI_DIR to the folder of ComfyUI's source" in worker.log_text()
    finally:
        worker.cleanup()


def test_bad_configuration_is_one_clear_error(tmp_path: Path) -> None:
    env = worker_env(tmp_path, COMFYUI_PORT="eighty", API_KEY="   ")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        assert worker.wait(30) == 2
        assert "COMFYUI_PORT='eighty' is not valid; accepted: an integer from 1 to 65535" in worker.log_text()
    finally:
        worker.cleanup()


async def test_warmup_runs_before_ready_and_a_failing_one_degrades(tmp_path: Path) -> None:
    warm = tmp_path / "warm.json"
    warm.write_text(
        '{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},'
        ' "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}'
    )
    env = worker_env(tmp_path, WARMUP_WORKFLOW=warm)
    with running_supervisor(env) as sup:
        assert (await sup.wait_ready(30)).state is State.READY
    env = worker_env(tmp_path, WARMUP_WORKFLOW=warm, STANDIN_NODE_FAULT="PreviewImage:error:warm boom")
    with running_supervisor(env) as sup:
        status = await sup.wait_ready(30)
        assert status.state is State.DEGRADED
        assert "warm-up failed at node 2 (PreviewImage): Exception: warm boom" in status.message
    refused = tmp_path / "refused.json"
    refused.write_text('{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},'
                       ' "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}')
    env = worker_env(tmp_path, WARMUP_WORKFLOW=refused)
    with running_supervisor(env) as sup:
        status = await sup.wait_ready(30)
        assert status.state is State.DEGRADED
        assert "warm-up failed: ComfyUI refused the warm-up workflow (400):" in status.message
        assert "required_input_missing" in status.message


async def test_wait_ready_times_out_with_the_state_and_fails_fast_when_failed(tmp_path: Path) -> None:
    env = worker_env(tmp_path, STANDIN_START_DELAY_S=5)
    with running_supervisor(env) as sup:
        with pytest.raises(TimeoutError, match=r"not ready within 0.2 s \(state starting"):
            await sup.wait_ready(0.2)
    env = worker_env(tmp_path, STANDIN_START_FAULT="exit:1", CRASH_LOOP_MAX=1)
    with running_supervisor(env) as sup:
        with pytest.raises(RuntimeError, match="ComfyUI failed 1 time within"):
            await sup.wait_ready(30)
        assert sup.status().state is State.FAILED


async def test_start_timeout_kills_and_counts_as_a_failure(tmp_path: Path) -> None:
    env = worker_env(tmp_path, STANDIN_START_FAULT="hang", COMFYUI_START_TIMEOUT_S=1, CRASH_LOOP_MAX=1)
    with running_supervisor(env) as sup:
        with pytest.raises(RuntimeError, match=r"did not become ready within 1 s"):
            await sup.wait_ready(30)


async def test_model_paths_reach_comfyui_from_every_root(tmp_path: Path) -> None:
    models, volume = tmp_path / "models", tmp_path / "volume"
    (models / "ipadapter").mkdir(parents=True)
    (models / "ipadapter" / "baked.safetensors").write_bytes(b"x")
    (volume / "ipadapter").mkdir(parents=True)
    (volume / "ipadapter" / "on-volume.bin").write_bytes(b"x")
    (volume / "clip_vision").mkdir(parents=True)
    (volume / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors").write_bytes(b"x")
    env = worker_env(tmp_path, MODELS_DIR=models, VOLUME_MODELS_DIR=volume)
    import aiohttp

    with running_supervisor(env) as sup:
        await sup.wait_ready(30)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{sup.base_url}/models/ipadapter") as resp:
                assert sorted(await resp.json()) == ["baked.safetensors", "on-volume.bin"]
            async with http.get(f"{sup.base_url}/models/clip_vision") as resp:
                assert await resp.json() == ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"]


async def test_a_comfyui_stopped_while_starting_is_killed_without_waiting_for_the_start_timeout(tmp_path: Path) -> None:
    env = worker_env(tmp_path, STANDIN_START_DELAY_S=3, HEALTH_INTERVAL_S=0.2, HEALTH_FAILURES=3,
                     COMFYUI_START_TIMEOUT_S=120)
    with running_supervisor(env) as sup:
        pid = wait_for(lambda: sup.status().pid, 10, what="the first pid")
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        crash = await asyncio.wait_for(sup.wait_exit(1), 20)
        assert crash.reason == "killed as hung"
        assert time.monotonic() - stopped_at < 0.2 * 3 + 2.0
        again = await sup.wait_ready(30)
        assert again.generation == 2 and again.state is State.READY
