"""supervisor.supervision.healthcheck, the image's HEALTHCHECK: its verdict on every kind of state file (no engine needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.supervision.healthcheck import EXIT_HEALTHY, EXIT_UNHEALTHY, check

ROOT = Path(__file__).resolve().parents[2]


def write_state(path: Path, **fields: Any) -> Path:
    body = {"state": "ready", "pid": 4242, "worker_pid": os.getpid(), "updated_at": time.time(), "message": "ok",
            "missing_classes": []}
    body.update(fields)
    path.write_text(json.dumps(body))
    return path


def test_ready_with_a_live_worker_is_healthy(tmp_path: Path) -> None:
    code, line = check(write_state(tmp_path / "s.json"))
    assert code == EXIT_HEALTHY and line == "healthy: supervisor state is 'ready'"


def test_degraded_is_serving_so_healthy_and_says_what_is_missing(tmp_path: Path) -> None:
    code, line = check(write_state(tmp_path / "s.json", state="degraded", missing_classes=["IPAdapterAdvanced"]))
    assert code == EXIT_HEALTHY and "IPAdapterAdvanced" in line


@pytest.mark.parametrize("state", ["starting", "restarting", "stopping", "failed"])
def test_every_non_serving_state_is_unhealthy(tmp_path: Path, state: str) -> None:
    code, line = check(write_state(tmp_path / "s.json", state=state, message=f"why {state}\nsecond line"))
    assert code == EXIT_UNHEALTHY
    assert line == f"unhealthy: supervisor state is '{state}': why {state}"


def test_failed_wins_over_a_live_pid(tmp_path: Path) -> None:
    """A fresh container reading a volume's state file: its own PID 1 is alive, the state is still 'failed'."""
    code, line = check(write_state(tmp_path / "s.json", state="failed", worker_pid=1))
    assert code == EXIT_UNHEALTHY and "'failed'" in line


def test_a_dead_worker_is_unhealthy_even_if_the_file_says_ready(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    code, line = check(write_state(tmp_path / "s.json", worker_pid=proc.pid))
    assert code == EXIT_UNHEALTHY and "is gone" in line


def test_a_file_older_than_the_worker_is_left_from_an_earlier_run(tmp_path: Path) -> None:
    """After `docker restart`, /tmp still holds the last run's 'ready' and PID 1 is alive again: not healthy."""
    code, line = check(write_state(tmp_path / "s.json", updated_at=time.time() - 10 * 365 * 86400))
    assert code == EXIT_UNHEALTHY and "earlier run" in line


@pytest.mark.parametrize("content, words", [
    (None, "no state file"),
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"state": "ready"}', "names no worker_pid"),
])
def test_unreadable_or_incomplete_files_are_unhealthy(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    code, line = check(path)
    assert code == EXIT_UNHEALTHY and words in line


def test_no_state_file_configured_is_unhealthy() -> None:
    code, line = check(None)
    assert code == EXIT_UNHEALTHY and "STATE_FILE is not set" in line


def run_module(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor.supervision.healthcheck"], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=30)


def test_the_module_reads_state_file_from_the_environment_and_exits_with_the_verdict(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if k != "STATE_FILE"}
    path = write_state(tmp_path / "s.json")
    ok = run_module({**base, "STATE_FILE": str(path)})
    assert ok.returncode == 0 and ok.stdout == "healthy: supervisor state is 'ready'\n"
    write_state(path, state="failed", message="ComfyUI failed 5 times within 300 s; giving up")
    bad = run_module({**base, "STATE_FILE": str(path)})
    assert bad.returncode == 1
    assert bad.stdout == "unhealthy: supervisor state is 'failed': ComfyUI failed 5 times within 300 s; giving up\n"


def test_a_bad_configuration_is_unhealthy_without_echoing_secrets(tmp_path: Path) -> None:
    env = {**os.environ, "STATE_FILE": str(write_state(tmp_path / "s.json")), "API_PORT": "not-a-port",
           "API_KEY": "sekrit-value-123"}
    proc = run_module(env)
    assert proc.returncode == 1 and proc.stdout.startswith("unhealthy: the worker's configuration is invalid")
    assert "sekrit-value-123" not in proc.stdout + proc.stderr
