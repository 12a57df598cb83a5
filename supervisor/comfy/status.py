"""The supervisor's public vocabulary: its states, what a crash looks like, and the handle jobs hold.

These types are shared by the supervisor (which owns the ComfyUI process on its own thread and event loop)
and by the job engine and front doors (which run on another loop). Everything here is plain data or a
Protocol, so the job side depends on the supervisor's contract, never on its internals.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from supervisor.config import Settings


class State(str, enum.Enum):
    """Lifecycle of the supervised ComfyUI; see the state diagram in docs/architecture.md."""

    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"  # serving, but some required node classes are missing or the warm-up failed
    RESTARTING = "restarting"
    FAILED = "failed"  # crash loop or start-up impossible: the worker stops taking jobs and exits non-zero
    STOPPING = "stopping"

    @property
    def serving(self) -> bool:
        """Whether jobs may be sent to ComfyUI in this state."""
        return self in (State.READY, State.DEGRADED)


@dataclass(frozen=True)
class CrashInfo:
    """Why one ComfyUI process (one generation) ended, as a job in flight is told."""

    generation: int
    pid: int | None
    exit_code: int | None  # None when it was killed by a signal
    signal: int | None  # e.g. 9 for SIGKILL
    reason: str  # "exited", "killed as hung", "stopped", "failed to start"
    last_lines: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for people, e.g. 'ComfyUI (pid 123) was killed by signal 9 (SIGKILL)'."""
        import signal as _signal

        who = f"ComfyUI (pid {self.pid})" if self.pid else "ComfyUI"
        if self.reason == "killed as hung":
            return f"{who} stopped answering and was killed"
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"{who} was killed by signal {self.signal} ({name})"
        if self.exit_code is not None:
            return f"{who} exited with code {self.exit_code}"
        return f"{who} {self.reason}"


@dataclass(frozen=True)
class Status:
    """A snapshot of the supervisor, served by the health endpoints and written to the state file."""

    state: State
    pid: int | None
    generation: int
    restarts: int
    uptime_s: float | None
    last_exit: CrashInfo | None
    missing_classes: tuple[str, ...] = ()
    import_failures: tuple[str, ...] = ()
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        last = None
        if self.last_exit is not None:
            last = {
                "pid": self.last_exit.pid,
                "exit_code": self.last_exit.exit_code,
                "signal": self.last_exit.signal,
                "reason": self.last_exit.reason,
                "description": self.last_exit.describe(),
            }
        return {
            "state": self.state.value,
            "pid": self.pid,
            "generation": self.generation,
            "restarts": self.restarts,
            "uptime_s": None if self.uptime_s is None else round(self.uptime_s, 3),
            "last_exit": last,
            "missing_classes": list(self.missing_classes),
            "import_failures": list(self.import_failures),
            "message": self.message,
            **self.extra,
        }


def describe_instance(label: str, settings: Settings, status: Status) -> dict[str, Any]:
    """One ComfyUI instance as the worker reports it (``/health``, the state file): which one, on which GPU
    (its ``CUDA_VISIBLE_DEVICES``; None when it has the worker's own) and port, and its supervisor's status."""
    gpu = settings.child_env.get("CUDA_VISIBLE_DEVICES") if settings.instances > 1 else None
    body = status.to_dict()
    return {"instance": label, "gpu": gpu, "port": settings.comfyui_port,
            **{k: body[k] for k in ("state", "pid", "generation", "restarts", "uptime_s", "last_exit", "message")}}


class ComfyHandle(Protocol):
    """What the job engine needs from the supervisor. Every method is safe to call from any thread/loop."""

    @property
    def base_url(self) -> str:
        """ComfyUI's HTTP base, e.g. http://127.0.0.1:8188."""

    def status(self) -> Status:
        """The current snapshot."""

    def wait_ready(self, timeout: float | None) -> Awaitable[Status]:
        """Awaitable in the caller's loop: resolves once the state is serving (ready or degraded).

        Raises TimeoutError after ``timeout`` s, and RuntimeError if the supervisor is failed or stopping.
        """

    def wait_exit(self, generation: int) -> Awaitable[CrashInfo]:
        """Awaitable in the caller's loop: resolves when that generation's process has ended.

        Resolves at once if it already has. A job watches this to fail the moment ComfyUI dies.
        """

    def log_tail(self, n: int = 20) -> list[str]:
        """The last ``n`` lines ComfyUI printed that can explain a failure (stdout and stderr, in order; routine
        lines such as ``got prompt`` and ``Prompt executed in ...`` left out)."""

    def restart(self, generation: int, reason: str) -> Awaitable[CrashInfo]:
        """Awaitable in the caller's loop: kill that generation's process tree and start a new one.

        For a ComfyUI that does not let go of an interrupted prompt (a node that never checks the flag). Resolves
        once that process has ended (at once if it already had); a restart asked for an older generation is a
        no-op. Such a restart does not count towards the crash-loop breaker.
        """
