"""A port the worker needs that is already taken stops start-up before ComfyUI is spawned: one line naming the
port, the variable to change and the process holding it; no traceback, and any server on the port is refused
(a ComfyUI left over from an earlier run of ours on the same DATA_DIR is stopped first: tests/test_leftover_comfyui.py)."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers.make_dev import make_dev_env
from tests.helpers.standin import StandIn
from tests.helpers.worker import ROOT, WorkerProcess, free_port, wait_for, worker_env

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def other_server() -> Iterator[subprocess.Popen[bytes]]:
    """Somebody else's server on a loopback port: ``python -m http.server``."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.port = port  # type: ignore[attr-defined]
    try:
        wait_for(lambda: _answers(port), 10, what=f"http.server on {port}")
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
            return True
    except OSError:
        return False


def start_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)


def assert_refused(run: subprocess.CompletedProcess[str], port: int, variable: str, holder_pid: int,
                   data_dir: Path) -> None:
    output = (run.stdout + run.stderr).strip()
    assert run.returncode == 2, output
    assert output == (f"comfyui-worker: port {port} on 127.0.0.1 ({variable}) is already in use by pid "
                      f"{holder_pid} ({_name(holder_pid)}); stop that server, or set {variable} to a free port")
    assert not data_dir.exists(), "the worker prepared ComfyUI's folders: it got past the port check"


def _name(pid: int) -> str:
    return psutil.Process(pid).name()


def test_a_taken_api_port_stops_start_up_with_one_line(tmp_path: Path, other_server: subprocess.Popen[bytes]) -> None:
    port = other_server.port  # type: ignore[attr-defined]
    env = worker_env(tmp_path, API_PORT=str(port))
    assert_refused(start_worker(env), port, "API_PORT", other_server.pid, tmp_path / "data")


def test_a_comfyui_already_on_its_port_is_refused(tmp_path: Path, standin: StandIn) -> None:
    env = worker_env(tmp_path, COMFYUI_PORT=str(standin.port))
    assert_refused(start_worker(env), standin.port, "COMFYUI_PORT", standin.proc.pid, tmp_path / "data")
    assert standin.proc.poll() is None, "the worker must not touch a server it does not own"


def test_runpod_mode_checks_comfyuis_port_too(tmp_path: Path, other_server: subprocess.Popen[bytes]) -> None:
    port = other_server.port  # type: ignore[attr-defined]
    env = worker_env(tmp_path, COMFYUI_PORT=str(port), WORKER_MODE="runpod")
    assert_refused(start_worker(env), port, "COMFYUI_PORT", other_server.pid, tmp_path / "data")


def test_make_dev_on_a_taken_port_says_so_in_one_line(tmp_path: Path, other_server: subprocess.Popen[bytes]) -> None:
    port = other_server.port  # type: ignore[attr-defined]
    env = make_dev_env(tmp_path)
    env["API_PORT"] = str(port)
    run = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "dev",
                          f"DEV_DATA={tmp_path / 'dev'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and "[comfyui]" not in run.stderr, run.stderr
    ours = [line for line in run.stderr.splitlines() if line.startswith("comfyui-worker:")]
    assert ours == [f"comfyui-worker: port {port} on 127.0.0.1 (API_PORT) is already in use by pid "
                    f"{other_server.pid} ({_name(other_server.pid)}); stop that server, or set API_PORT to a free "
                    "port"], run.stderr
    assert not (tmp_path / "dev" / "jobs.sqlite3").exists()


def test_the_same_port_for_api_and_comfyui_is_a_configuration_error(tmp_path: Path) -> None:
    port = free_port()
    run = start_worker(worker_env(tmp_path, API_PORT=str(port), COMFYUI_PORT=str(port)))
    assert run.returncode == 2
    assert (f"API_PORT={port} and COMFYUI_PORT={port} are the same port; accepted: two different ports"
            in run.stderr), run.stderr


def test_free_ports_pass_and_the_worker_starts(tmp_path: Path) -> None:
    """The check itself must not hold a port: right after it, ComfyUI and the API bind theirs."""
    worker = WorkerProcess(worker_env(tmp_path), tmp_path / "worker.log")
    try:
        wait_for(lambda: "API listening on" in worker.log_text(), 30, what="the API to listen")
        worker.wait_state("ready")
    finally:
        worker.cleanup()


@pytest.mark.parametrize("variable", ["PORT", "PORT_HEALTH"])
def test_runpod_lb_mode_checks_port_and_port_health(tmp_path: Path, other_server: subprocess.Popen[bytes],
                                                    variable: str) -> None:
    port = other_server.port  # type: ignore[attr-defined]
    ports = {"PORT": str(free_port()), "PORT_HEALTH": str(free_port()), variable: str(port)}
    env = worker_env(tmp_path, WORKER_MODE="runpod-lb", API_HOST="127.0.0.1", **ports)
    assert_refused(start_worker(env), port, variable, other_server.pid, tmp_path / "data")


def test_runpod_mode_checks_metrics_port(tmp_path: Path, other_server: subprocess.Popen[bytes]) -> None:
    port = other_server.port  # type: ignore[attr-defined]
    env = worker_env(tmp_path, WORKER_MODE="runpod", METRICS_PORT=str(port))
    assert_refused(start_worker(env), port, "METRICS_PORT", other_server.pid, tmp_path / "data")


def test_runpod_lb_port_equal_to_comfyuis_is_a_configuration_error(tmp_path: Path) -> None:
    port = free_port()
    run = start_worker(worker_env(tmp_path, WORKER_MODE="runpod-lb", API_HOST="127.0.0.1", PORT=str(port),
                                  COMFYUI_PORT=str(port)))
    assert run.returncode == 2
    assert f"PORT={port} and COMFYUI_PORT={port} are the same port" in run.stderr, run.stderr
