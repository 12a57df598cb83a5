"""A ComfyUI left over by a worker of ours that was killed -9 is recognised and stopped (issue 15, item 3).

Found by attacking the worker: after ``kill -9`` of the worker (outside a container) its ComfyUI kept the port;
the next worker took it for its own, ran jobs on that unsupervised server, while its own ComfyUI could not bind
and flapped. Now the supervisor records its ComfyUI in ``DATA_DIR/comfyui.pid`` (pid, tree marker, start time,
port); the next worker on the same DATA_DIR stops that tree before the port check, and any other server on the
port is still refused -- also one whose pid a stale pid file happens to name. The first test takes the ``comfy``
fixture: it runs on the real ComfyUI too (``make test-real``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers.api import Api
from tests.helpers.comfy_targets import ComfyTarget
from tests.helpers.worker import ROOT, WorkerProcess, free_port, tree_processes, wait_for, worker_env

pytestmark = pytest.mark.timeout(120)


def test_a_comfyui_left_by_a_killed_worker_is_stopped_and_the_next_worker_serves_with_its_own(
    tmp_path: Path, comfy: ComfyTarget
) -> None:
    env = worker_env(tmp_path, API_PORT=str(free_port()), WORKER_MODE="http", STANDIN_SPAWN_GRANDCHILD="1",
                     **comfy.env)
    first = WorkerProcess(env, tmp_path / "first.log")
    second = None
    try:
        old_pid = int(first.wait_state("ready", comfy.start_timeout_s)["pid"])
        record = json.loads((tmp_path / "data" / "comfyui.pid").read_text())
        assert record["pid"] == old_pid and record["port"] == int(env["COMFYUI_PORT"])
        old_tree = {p.pid for p in tree_processes(env["TEST_TREE_ID"])} - {first.proc.pid}
        assert old_pid in old_tree and (comfy.is_real or len(old_tree) >= 2)  # the stand-in: and its grandchild
        first.proc.kill()  # kill -9 of the worker alone: its ComfyUI tree keeps running, and keeps the port
        first.proc.wait(10)
        assert psutil.pid_exists(old_pid)

        second = WorkerProcess(env, tmp_path / "second.log")
        state = wait_for(lambda: (s := second.state()) and s["state"] == "ready" and s["pid"] != old_pid and s,
                         comfy.start_timeout_s,
                         what="the second worker's own ComfyUI to be ready")
        new_pid = int(state["pid"])
        assert not [p for p in old_tree if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"], \
            "the leftover tree survived"
        log = second.log_text()
        assert f"stopped a ComfyUI left by an earlier worker on {tmp_path / 'data'} (pid {old_pid}, port " \
               f"{env['COMFYUI_PORT']}" in log, log
        api = Api(f"http://127.0.0.1:{env['API_PORT']}")
        wait_for(lambda: api.get("/ready")[0] == 200, 30, what="the second worker's API")
        body = api.ok("POST", "/runsync", {"input": {"workflow": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "after"}}}}})
        assert body["status"] == "COMPLETED", body
        assert json.loads((tmp_path / "data" / "comfyui.pid").read_text())["pid"] == new_pid
        second.shutdown()
        assert not (tmp_path / "data" / "comfyui.pid").exists()  # a clean stop forgets it
    finally:
        for w in (first, second):
            if w is not None:
                w.cleanup()


def test_a_stale_pid_file_naming_another_server_does_not_make_it_ours(tmp_path: Path) -> None:
    """The pid file names the server on the port, but the process carries no marker of ours: refused, untouched."""
    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(c.laddr.port == port for c in psutil.Process(other.pid).net_connections()), 10,
                 what="http.server to listen")
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "comfyui.pid").write_text(json.dumps({
            "pid": other.pid, "marker": "0" * 32, "port": port, "created": psutil.Process(other.pid).create_time()}))
        env = worker_env(tmp_path, COMFYUI_PORT=str(port))
        run = subprocess.run([sys.executable, "-m", "supervisor"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=30)
        assert run.returncode == 2, run.stderr
        assert f"port {port} on 127.0.0.1 (COMFYUI_PORT) is already in use by pid {other.pid}" in run.stderr
        assert "left by an earlier worker" not in run.stderr
        assert other.poll() is None, "the worker must not touch a server it does not own"
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait(10)
    assert not os.path.exists(tmp_path / "data" / "comfyui.pid")  # stale: forgotten
