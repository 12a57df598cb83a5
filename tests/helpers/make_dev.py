"""`make dev` run as a user runs it, in its own process group, with its data under the test's folder."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.worker import ROOT, free_port, tree_processes, wait_for, worker_env

# What `make dev` sets itself: none of the test's own values for these may leak into it.
MAKE_DEV_SETS = ("COMFYUI_DIR", "COMFYUI_ARGS", "DATA_DIR", "MODELS_DIR", "STATE_FILE", "WORKFLOWS_DIR",
                 "VOLUME_MODELS_DIR", "WORKER_MODE")


@dataclass
class MakeDev:
    api_url: str
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_dev_env(tmp_path: Path) -> dict[str, str]:
    """A user's environment for `make dev`, with free ports and a TEST_TREE_ID to find its processes by."""
    env = worker_env(tmp_path, API_PORT=str(free_port()), COMFYUI_PORT=str(free_port()))
    for key in MAKE_DEV_SETS:
        env.pop(key, None)
    return env


@contextmanager
def make_dev(tmp_path: Path, *make_args: str, log_name: str = "make-dev.log",
             env: dict[str, str] | None = None) -> Iterator[MakeDev]:
    """``make dev DEV_DATA=<tmp_path>/dev *make_args`` until /ready answers; stopped with SIGTERM at the end, and
    its whole tree checked for leftovers. ``-o .venv/.installed``: never reinstalls the virtual environment."""
    env = env or make_dev_env(tmp_path)
    log_path = tmp_path / log_name
    with open(log_path, "wb") as log:
        dev = subprocess.Popen(["make", "-o", ".venv/.installed", "dev", f"DEV_DATA={tmp_path / 'dev'}", *make_args],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        running = MakeDev(api_url=f"http://127.0.0.1:{env['API_PORT']}", log_path=log_path)
        try:
            wait_for_ready(dev, running.api_url, log_path, 60, "make dev")
            yield running
        finally:
            _stop(dev, env["TEST_TREE_ID"])


def wait_for_ready(proc: subprocess.Popen[bytes], api_url: str, log_path: Path, timeout: float, what: str) -> None:
    """Until ``GET api_url/ready`` answers 200 (ready to take a job); fails at once, with ``what``'s log, when ``proc`` ends first."""
    def healthy() -> bool:
        assert proc.poll() is None, f"{what} ended:\n{log_path.read_text(errors='replace')[-3000:]}"
        try:
            with urllib.request.urlopen(f"{api_url}/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait_for(healthy, timeout, interval=0.1, what=f"{what} to serve {api_url}/ready")


def _stop(dev: subprocess.Popen[bytes], tree_id: str) -> None:
    if dev.poll() is None:
        os.killpg(dev.pid, signal.SIGTERM)
    try:
        dev.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(dev.pid, signal.SIGKILL)
        dev.wait(10)
    deadline = time.monotonic() + 5
    while tree_processes(tree_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers = tree_processes(tree_id)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, leftovers
