"""``WORKER_MODE=runpod-lb``: the self-hosted API as the worker's own server behind RunPod's load balancer.

RunPod sets ``PORT`` (requests) and ``PORT_HEALTH`` (its ``GET /ping`` probe: 204 initializing, 200 healthy) and
authenticates callers at its gateway, so this mode listens on every address without ``API_KEY`` (and still
honours one when set). The real worker process runs with the stand-in ComfyUI, which takes a second to start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import load_settings
from tests.helpers.api import Api, http_get, pings
from tests.helpers.standin import free_port
from tests.helpers.worker import WorkerProcess, worker_env

pytestmark = pytest.mark.timeout(120)

GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 255}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "lb"}}}


def test_port_and_port_health_win_over_api_port() -> None:
    s = load_settings({"WORKER_MODE": "runpod-lb", "PORT": "8080", "PORT_HEALTH": "8081", "API_PORT": "9000"})
    assert (s.api_host, s.api_port, s.health_port) == ("0.0.0.0", 8080, 8081)
    s = load_settings({"WORKER_MODE": "runpod-lb"})
    assert (s.api_port, s.health_port) == (80, None)  # PORT_HEALTH defaults to PORT: one listener
    s = load_settings({"WORKER_MODE": "runpod-lb", "PORT": "8080", "PORT_HEALTH": "8080", "API_HOST": "10.0.0.5"})
    assert (s.api_host, s.api_port, s.health_port) == ("10.0.0.5", 8080, None)
    s = load_settings({"PORT": "8080", "PORT_HEALTH": "8081"})  # other modes do not read them
    assert (s.api_host, s.api_port, s.health_port) == ("127.0.0.1", 8000, None)


@contextmanager
def lb_worker(tmp_path: Path, **env: Any) -> Iterator[WorkerProcess]:
    full = worker_env(tmp_path, WORKER_MODE="runpod-lb", STANDIN_START_DELAY_S="1", **env)
    for name in ("API_HOST", "API_KEY"):
        if name not in env:
            full.pop(name, None)
    worker = WorkerProcess(full, tmp_path / "worker.log")
    try:
        yield worker
    finally:
        worker.shutdown()


def running(worker: WorkerProcess) -> Callable[[], str | None]:
    """For pings(): None while the worker runs, else its log's end."""
    return lambda: None if worker.proc.poll() is None else worker.log_text()[-3000:]


def test_ping_on_port_health_goes_204_then_200_and_runsync_is_served_on_port(tmp_path: Path) -> None:
    port, health = free_port(), free_port()
    with lb_worker(tmp_path, PORT=str(port), PORT_HEALTH=str(health)) as worker:
        assert pings(f"http://127.0.0.1:{health}/ping", running(worker)) == [204, 200]
        log = worker.log_text()
        assert f"API listening on http://0.0.0.0:{port} (auth: none" in log  # the one exception: no key needed
        assert f"probes (/ping, /health, /ready) also on http://0.0.0.0:{health} (PORT_HEALTH)" in log
        api = Api(f"http://127.0.0.1:{port}")
        body = api.ok("POST", "/runsync", {"input": {"workflow": GRAPH}})
        assert body["status"] == "COMPLETED" and body["output"]["images"][0]["type"] == "base64", body
        assert http_get(f"http://127.0.0.1:{port}/ping")[0] == 200  # also on the main port
        assert http_get(f"http://127.0.0.1:{health}/ready")[0] == 200
        status, _ = Api(f"http://127.0.0.1:{health}").post("/runsync", {"input": {"workflow": GRAPH}})
        assert status == 404  # the health port serves the probes only


def test_an_api_key_is_still_honoured(tmp_path: Path) -> None:
    port = free_port()
    with lb_worker(tmp_path, PORT=str(port), API_KEY="lb-key", API_HOST="127.0.0.1") as worker:
        assert pings(f"http://127.0.0.1:{port}/ping", running(worker))[-1] == 200  # PORT_HEALTH unset: the same port
        api = Api(f"http://127.0.0.1:{port}")
        assert api.post("/runsync", {"input": {"workflow": GRAPH}}, key=None)[0] == 401
        assert api.post("/runsync", {"input": {"workflow": GRAPH}}, key="lb-key")[1]["status"] == "COMPLETED"
