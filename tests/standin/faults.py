"""Fault injection by environment variables: the contract tests use to make the stand-in misbehave.

The supervisor hands its environment to ComfyUI, so a test sets these on the worker and the worker never
knows. The contract (documented in README.md) is fixed because other code is written against it:

* ``STANDIN_START_DELAY_S=<float>``  sleep before serving.
* ``STANDIN_START_FAULT=exit[:code]|kill|hang``  die (traceback-like text, exit code default 1), SIGKILL
  itself, or hang forever without serving.
* ``STANDIN_NODE_FAULT=<target>:<action>[,...]``  target = class_type or node id; action = ``exit[:code]``,
  ``kill``, ``hang`` (the whole server stops answering), ``error[:message]``, ``oom``, ``sleep:<seconds>`` (a
  long node that never looks at the interrupt flag, as a real node without a progress bar).
* ``STANDIN_STEP_DELAY_S`` (default 0.01) per sampler step; ``STANDIN_NODE_DELAY_S`` (default 0) per node.
* ``STANDIN_SPAWN_GRANDCHILD=1``  spawn a python child that ignores SIGINT/SIGTERM and sleeps forever.
* ``STANDIN_REQUEST_LOG=<path>``  one JSON line per HTTP request and ws connect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        return default


def step_delay() -> float:
    """Seconds each sampler step takes (read per call, so a test can't be fooled by a stale value)."""
    return _float_env("STANDIN_STEP_DELAY_S", 0.01)


def node_delay() -> float:
    """Extra seconds every executed node takes."""
    return _float_env("STANDIN_NODE_DELAY_S", 0.0)


def start_delay() -> float:
    return _float_env("STANDIN_START_DELAY_S", 0.0)


def request_log_path() -> str | None:
    return os.environ.get("STANDIN_REQUEST_LOG") or None


@dataclass(frozen=True)
class NodeFault:
    """One ``target:action[:arg]`` entry of STANDIN_NODE_FAULT."""

    target: str
    action: str
    arg: str | None


def parse_node_faults(spec: str | None) -> list[NodeFault]:
    """Parse ``target:action[:arg],...``; an error message may itself contain colons."""
    faults: list[NodeFault] = []
    for entry in (spec or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) < 2:
            continue
        target, action = parts[0].strip(), parts[1].strip().lower()
        arg = parts[2] if len(parts) > 2 else None
        faults.append(NodeFault(target, action, arg))
    return faults


def node_faults() -> list[NodeFault]:
    return parse_node_faults(os.environ.get("STANDIN_NODE_FAULT"))


def fault_for(node_id: str, class_type: str) -> NodeFault | None:
    """The first fault whose target is this node's id or class."""
    for fault in node_faults():
        if fault.target in (node_id, class_type):
            return fault
    return None


def _exit_code(arg: str | None, default: int = 1) -> int:
    try:
        return int(arg) if arg not in (None, "") else default
    except ValueError:
        return default


def seconds(arg: str | None, default: float) -> float:
    """A fault's duration argument; the default when it is missing or not a number."""
    try:
        return float(arg) if arg not in (None, "") else default
    except ValueError:
        return default


def die(message: str, code: int) -> None:
    """Print a Python-traceback-like crash report and leave without cleanup, as a crashing ComfyUI does."""
    sys.stdout.flush()
    sys.stderr.write("Traceback (most recent call last):\n"
                     f'  File "{os.path.abspath(sys.argv[0])}", line 1, in <module>\n'
                     f"RuntimeError: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def kill_self() -> None:
    """SIGKILL ourselves: no cleanup, no message, exactly like the OOM killer."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def hang_forever() -> None:
    """Block the calling thread for good (the event loop thread: the server stops answering).

    A wedged process does not leave on SIGINT either: KeyboardInterrupt is swallowed, so only SIGTERM or
    SIGKILL end it (which is what a supervisor's escalation must cope with).
    """
    while True:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            continue


def apply_start_fault() -> None:
    """STANDIN_START_FAULT, applied before anything is served."""
    spec = (os.environ.get("STANDIN_START_FAULT") or "").strip()
    if not spec:
        return
    action, _, arg = spec.partition(":")
    action = action.strip().lower()
    if action == "exit":
        die("standin: injected start-up failure (STANDIN_START_FAULT)", _exit_code(arg))
    elif action == "kill":
        kill_self()
    elif action == "hang":
        print("[standin] hanging at start-up (STANDIN_START_FAULT=hang)", file=sys.stderr, flush=True)
        hang_forever()


_GRANDCHILD_CODE = (
    "import signal, time\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)


def maybe_spawn_grandchild() -> subprocess.Popen | None:
    """STANDIN_SPAWN_GRANDCHILD=1: a child that survives SIGINT/SIGTERM, to test process-tree cleanup."""
    if os.environ.get("STANDIN_SPAWN_GRANDCHILD", "").strip() not in ("1", "true", "yes"):
        return None
    child = subprocess.Popen([sys.executable, "-c", _GRANDCHILD_CODE], stdin=subprocess.DEVNULL)
    print(f"[standin] grandchild pid {child.pid}", file=sys.stderr, flush=True)
    return child
