"""Helpers to run the real worker (``python -m supervisor``) or a real ComfySupervisor against the stand-in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from supervisor.config import Settings, load_settings
from supervisor.supervision.supervisor import ComfySupervisor
from tests.helpers.standin import free_port

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "standin"



def worker_env(tmp_path: Path, **overrides: Any) -> dict[str, str]:
    """An environment for a worker on the stand-in, with a unique TEST_TREE_ID to find its processes by."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STANDIN_", "RUNPOD_"))}
    env.update(
        COMFYUI_DIR=str(STANDIN),
        COMFYUI_PORT=str(free_port()),
        API_PORT=str(free_port()),
        COMFYUI_ARGS="--cpu",
        DATA_DIR=str(tmp_path / "data"),
        MODELS_DIR=str(tmp_path / "models"),
        VOLUME_MODELS_DIR=str(tmp_path / "no-volume"),
        WORKFLOWS_DIR=str(tmp_path / "no-workflows"),
        STATE_FILE=str(tmp_path / "state.json"),
        COMFYUI_START_TIMEOUT_S="30",
        HEALTH_INTERVAL_S="0.5",
        HEALTH_TIMEOUT_S="1",
        STOP_TIMEOUT_S="5",
        TEST_TREE_ID=uuid.uuid4().hex,
        PYTHONPATH=str(ROOT),
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def settings_for(env: Mapping[str, str]) -> Settings:
    return load_settings(env)


def tree_processes(tree_id: str) -> list[psutil.Process]:
    """Every live process (other than this test) that carries this TEST_TREE_ID in its environment."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("TEST_TREE_ID") == tree_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def describe_process(proc: psutil.Process) -> str:
    """pid, parent and command line: what a test names when a process outlived its worker."""
    try:
        return f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:300]}"
    except psutil.Error as exc:
        return f"pid {proc.pid}: {exc}"


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def running_supervisor(
    env: Mapping[str, str], listeners: Iterable[Callable[[Any], None]] = ()
) -> Iterator[ComfySupervisor]:
    """A real ComfySupervisor in this process; always stopped, and its tree checked for leftovers.

    ``listeners`` are attached before the start, so they see the very first transitions.
    """
    sup = ComfySupervisor(settings_for(env))
    for listener in listeners:
        sup.add_listener(listener)
    sup.start()
    try:
        yield sup
    finally:
        sup.stop()
        leftovers = tree_processes(env["TEST_TREE_ID"])
        for proc in leftovers:
            proc.kill()
        assert not leftovers, f"processes of the ComfyUI tree survived the stop: {leftovers}"


class WorkerProcess:
    """``python -m supervisor`` as a real child process, its log captured to a file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, preexec_fn: Callable[[], Any] | None = None) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor"], cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def state(self) -> dict[str, Any] | None:
        return read_state(Path(self.env["STATE_FILE"]))

    def wait_state(self, state: str, timeout: float = 30) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.state()) and s["state"] == state and s,
            timeout,
            what=f"state {state} (log:\n{self.log_text()[-3000:]})",
        )

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def shutdown(self, timeout: float = 30) -> None:
        """SIGTERM and wait (as a platform stops it), then ``cleanup``; fails if a process of its tree survived."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass  # cleanup() kills it
        self.cleanup()
        leftovers = tree_processes(self.env["TEST_TREE_ID"])
        for proc in leftovers:
            proc.kill()
        assert not leftovers, f"processes survived the worker: {leftovers}"

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()
        for proc in tree_processes(self.env["TEST_TREE_ID"]):
            proc.kill()
