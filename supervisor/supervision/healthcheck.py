"""``python -m supervisor.supervision.healthcheck``: the image's HEALTHCHECK, the same in both worker modes.

RunPod mode has no HTTP API, so the check reads the supervisor's state file (``STATE_FILE``), which the
supervisor rewrites atomically on every state change. Healthy (exit 0) iff

* the file says ``ready`` or ``degraded`` (the serving states), and
* the worker that wrote it (``worker_pid``) is alive, and was already running when the file was written
  (so a file left behind by an earlier run of the container, whose PID was reused, does not count).

Anything else is unhealthy (exit 1): ``starting``, ``restarting``, ``stopping``, ``failed`` (the crash-loop
breaker tripped; the worker is exiting), a missing or unreadable file, a dead worker. The one line printed is
what Docker keeps in ``State.Health.Log``. Standard library only, no event loop: it runs every few seconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from supervisor.config import ConfigError, load_settings

SERVING = ("ready", "degraded")
EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
CLOCK_SLACK_S = 2.0  # /proc start times have clock-tick resolution; boot time is whole seconds


def check(state_file: Path | None) -> tuple[int, str]:
    """(exit code, one line) for the state file at ``state_file``."""
    if state_file is None:
        return EXIT_UNHEALTHY, "unhealthy: STATE_FILE is not set, so the supervisor's state cannot be read"
    try:
        raw = state_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return EXIT_UNHEALTHY, f"unhealthy: no state file at {state_file} yet (the worker has not started)"
    except OSError as exc:
        return EXIT_UNHEALTHY, f"unhealthy: cannot read the state file {state_file}: {exc.strerror or exc}"
    try:
        body: Any = json.loads(raw)
    except ValueError:
        return EXIT_UNHEALTHY, f"unhealthy: the state file {state_file} is not JSON"
    if not isinstance(body, dict):
        return EXIT_UNHEALTHY, f"unhealthy: the state file {state_file} is not a JSON object"
    state = body.get("state")
    message = _first_line(body.get("message"))
    if state not in SERVING:
        detail = f": {message}" if message else ""
        return EXIT_UNHEALTHY, f"unhealthy: supervisor state is {state!r}{detail}"
    worker_pid = body.get("worker_pid")
    if not isinstance(worker_pid, int) or worker_pid <= 0:
        return EXIT_UNHEALTHY, f"unhealthy: the state file {state_file} names no worker_pid"
    if not _alive(worker_pid):
        return EXIT_UNHEALTHY, f"unhealthy: state file says {state!r} but the worker (pid {worker_pid}) is gone"
    started = _process_start_time(worker_pid)
    updated = body.get("updated_at")
    if started is not None and isinstance(updated, (int, float)) and started > updated + CLOCK_SLACK_S:
        return EXIT_UNHEALTHY, (f"unhealthy: the state file is older than the worker (pid {worker_pid}); "
                                "it was left by an earlier run")
    detail = f" (missing classes: {', '.join(body.get('missing_classes') or [])})" if state == "degraded" else ""
    return EXIT_HEALTHY, f"healthy: supervisor state is {state!r}{detail}"


def _first_line(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    line = value.strip().splitlines()[0] if value.strip() else ""
    return line if len(line) <= 300 else line[:297] + "..."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"


def _process_start_time(pid: int) -> float | None:
    """The wall-clock time a process started (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"unhealthy: the worker's configuration is invalid: {str(exc).splitlines()[0]}")
        return EXIT_UNHEALTHY
    code, line = check(settings.state_file)
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
