"""Every ComfyUI instance of the worker (``COMFYUI_INSTANCES``), supervised each on its own, seen as one.

Each instance is a :class:`~supervisor.supervision.supervisor.ComfySupervisor` of its own: its port, folders and
GPU (:meth:`~supervisor.config.Settings.for_instance`), its thread, its process tree, its restarts and crash-loop
breaker. A crash of one touches no other. The pool adds the worker-wide view the front doors need:

* one status: the worker serves while any instance serves (``ready`` before ``degraded``), and has ``failed``
  only when every instance has (then it exits 1); one state file for the image's HEALTHCHECK;
* start, drain and stop of every instance at once (each tree is stopped in parallel, so SIGTERM takes the time
  of the slowest, not of the sum).

Which instance runs a job is not the pool's business: the job layer picks a free serving one
(:mod:`supervisor.jobs.dispatch`) through each instance's ``ComfyHandle``, :attr:`ComfyPool.instances`.
With one instance the pool is that supervisor: same status, same state file, same messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from supervisor.comfy.status import State, Status, describe_instance
from supervisor.config import Settings
from supervisor.metrics import WorkerMetrics
from supervisor.supervision.supervisor import ComfySupervisor, StateFileWriter

# The worker's state when instances differ: the first of these that any instance is in.
STATE_ORDER = (State.STOPPING, State.READY, State.DEGRADED, State.STARTING, State.RESTARTING, State.FAILED)


class ComfyPool:
    """The worker's ComfyUI instances. Every public method is safe from any thread, like a supervisor's."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.instances: list[ComfySupervisor] = [
            ComfySupervisor(settings.for_instance(i), metrics, str(i)) for i in range(settings.instances)
        ]
        self._single = len(self.instances) == 1
        # With one instance its supervisor writes STATE_FILE itself (for_instance keeps it); with more, the pool.
        self._state_file = StateFileWriter(None if self._single else settings.state_file)
        if not self._single:
            self.add_listener(lambda _status: self._write_state_file())

    def start(self) -> None:
        """Spawn every instance, each on its own thread; returns at once."""
        if not self._single:
            self._write_state_file()
        for sup in self.instances:
            sup.start()

    def begin_shutdown(self) -> None:
        for sup in self.instances:
            sup.begin_shutdown()

    def stop(self, timeout: float | None = None) -> None:
        """Stop every instance's tree, all at once; blocking, idempotent."""
        for sup in self.instances:
            sup.request_stop()
        for sup in self.instances:
            sup.stop(timeout)
        self._state_file.close()

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Blocking: True once every instance has ended (failed or stopped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for sup in self.instances:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not sup.wait_finished(left):
                return False
        return True

    def status(self) -> Status:
        """The worker's status: the one instance's, or all of them combined (see :func:`combined_status`)."""
        statuses = [sup.status() for sup in self.instances]
        return statuses[0] if self._single else combined_status(statuses)

    def log_tail(self, n: int = 20) -> list[str]:
        if self._single:
            return self.instances[0].log_tail(n)
        return [f"[{sup.instance}] {line}" for sup in self.instances for line in sup.log_tail(n)]

    def add_listener(self, listener: Callable[[Status], None]) -> None:
        """``listener(worker status)`` on every state change of any instance (from that instance's thread)."""
        for sup in self.instances:
            sup.add_listener(lambda _status: listener(self.status()))

    def _write_state_file(self) -> None:
        self._state_file.write(lambda: {**self.status().to_dict(), "instances": self.describe()})

    def describe(self) -> list[dict[str, Any]]:
        """Each instance: its label, GPU, port and status (the state file's ``instances``)."""
        return [describe_instance(sup.instance, sup.settings, sup.status()) for sup in self.instances]


def combined_status(statuses: Sequence[Status]) -> Status:
    """Several instances as one: serving while any serves, failed only when all have; counts summed."""
    by_state = {s.state for s in statuses}
    state = next(st for st in STATE_ORDER if st in by_state)
    serving = sum(1 for s in statuses if s.state.serving)
    lines = [f"{i}: {s.state.value}" + (f" ({_first_line(s.message)})" if s.message else "")
             for i, s in enumerate(statuses)]
    exits = [s.last_exit for s in statuses if s.last_exit is not None]
    uptimes = [s.uptime_s for s in statuses if s.uptime_s is not None]
    return Status(
        state=state,
        pid=None,  # several processes: each instance's is in ``instances``
        generation=sum(s.generation for s in statuses),
        restarts=sum(s.restarts for s in statuses),
        uptime_s=max(uptimes) if uptimes else None,
        last_exit=exits[-1] if exits else None,
        missing_classes=tuple(dict.fromkeys(c for s in statuses for c in s.missing_classes)),
        import_failures=tuple(dict.fromkeys(f for s in statuses for f in s.import_failures)),
        message=f"{serving} of {len(statuses)} ComfyUI instances serving; " + "; ".join(lines),
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
