"""Child processes of the node installer (git, pip, install.py, ComfyUI): no build secrets in their environment,
no interactive prompts, output echoed with a prefix and kept for the error message."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

from ..common import env_without
from .config import SECRET_VARS


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for git, pip, install.py and ComfyUI: no build secrets, no interactive prompts."""
    env = env_without(SECRET_VARS)
    env.update(GIT_TERMINAL_PROMPT="0", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run(cmd: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None, timeout: float = 600,
        prefix: str = "") -> tuple[int, str]:
    """Run a command, echoing its output with a prefix; returns (exit code, output)."""
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env or child_env()), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as exc:
        return 127, f"cannot run {cmd[0]}: {exc}"
    lines: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if prefix:
                print(f"{prefix}{line}", end="", flush=True)
        code = proc.wait()
    finally:
        timer.cancel()
    output = "".join(lines)
    if code < 0:
        output += f"\n(killed after {timeout:.0f}s)" if code == -signal.SIGKILL else f"\n(signal {-code})"
    return code, output


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"
