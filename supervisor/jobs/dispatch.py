"""Which ComfyUI instance runs a job: a free one that serves.

With ``COMFYUI_INSTANCES`` > 1 the worker has one :class:`~supervisor.jobs.engine.JobEngine` per instance, each
knowing its instance's port and folders (:meth:`~supervisor.config.Settings.for_instance`) and watching that
process for a crash. One queue feeds them all: a job claims a free serving instance (fewer than
``Settings.jobs_per_instance`` jobs on it; the least used first, so work spreads evenly) and runs there from
start to end. If that ComfyUI dies, only the jobs on it fail (or are queued again on it, see the engine); the
others keep serving. An instance that is starting or restarting is simply not chosen.

The instances are reached only through their :class:`~supervisor.comfy.status.ComfyHandle` (jobs never import
the supervision part). Used by both front doors: the self-hosted API's runners and the RunPod handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from supervisor.comfy.status import ComfyHandle, State, describe_instance
from supervisor.config import Settings
from supervisor.jobs.engine import JobEngine
from supervisor.metrics import WorkerMetrics

RECHECK_S = 1.0  # a waiting claim looks again at least this often (a state change it was not told of)
FINAL = (State.FAILED, State.STOPPING)


@dataclass
class Instance:
    """One ComfyUI instance as the job layer sees it: its engine, and the jobs it is running and has run."""

    index: int
    engine: JobEngine
    running: int = 0
    completed: int = 0
    failed: int = 0

    @property
    def label(self) -> str:
        return str(self.index)

    @property
    def handle(self) -> ComfyHandle:
        return self.engine.comfy

    def state(self) -> State:
        return self.handle.status().state


class InstanceDispatcher:
    """Hands out free serving instances to jobs. Used from one event loop (the front door's)."""

    def __init__(self, engines: Sequence[JobEngine], jobs_per_instance: int | None = None) -> None:
        if not engines:
            raise ValueError("a dispatcher needs at least one instance")
        self.instances = [Instance(i, engine) for i, engine in enumerate(engines)]
        self.jobs_per_instance = jobs_per_instance or engines[0].settings.jobs_per_instance
        self._freed: list[asyncio.Future[None]] = []

    @classmethod
    def for_handles(cls, settings: Settings, handles: Sequence[ComfyHandle],
                    metrics: WorkerMetrics | None = None) -> "InstanceDispatcher":
        """One engine per instance, each with that instance's settings (port, folders)."""
        return cls([JobEngine(settings.for_instance(i), h, metrics) for i, h in enumerate(handles)],
                   settings.jobs_per_instance)

    # --- claiming -------------------------------------------------------------------------------------

    def free_instance(self) -> Instance | None:
        """The serving instance with room for a job, least busy and least used first; None if there is none."""
        free = [i for i in self.instances if i.running < self.jobs_per_instance and i.state().serving]
        return min(free, key=lambda i: (i.running, i.completed + i.failed, i.index), default=None)

    async def claim(self, timeout: float | None) -> Instance:
        """Wait for a free serving instance and take a place on it; release it with :meth:`release`.

        Raises TimeoutError after ``timeout`` s, RuntimeError when no instance will ever serve again (every one
        failed, or the worker is stopping).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            instance = self.free_instance()
            if instance is not None:
                instance.running += 1
                return instance
            self._raise_if_none_will_serve()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(self._not_free_text(timeout or 0.0))
            await self._something_changed(RECHECK_S if left is None else min(left, RECHECK_S))

    def release(self, instance: Instance, status: str | None) -> None:
        """The job on ``instance`` ended with ``status`` (None: no job ran); wake whoever waits for a place."""
        instance.running -= 1
        if status == "COMPLETED":
            instance.completed += 1
        elif status in ("FAILED", "TIMED_OUT"):
            instance.failed += 1
        waiters, self._freed = self._freed, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _something_changed(self, timeout: float) -> None:
        """Until a place is freed, an instance that is (re)starting serves, or ``timeout`` passes."""
        freed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._freed.append(freed)
        waits: list[asyncio.Future[Any]] = [freed]
        waits += [asyncio.ensure_future(i.handle.wait_ready(None)) for i in self.instances
                  if i.state() in (State.STARTING, State.RESTARTING)]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in waits:
                fut.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def _raise_if_none_will_serve(self) -> None:
        states = [i.state() for i in self.instances]
        if not all(state in FINAL for state in states):
            return
        if State.STOPPING in states:
            raise RuntimeError("the worker is shutting down and takes no new jobs")
        messages = [(i.handle.status().message or "").strip() for i in self.instances]
        if len(self.instances) == 1:
            raise RuntimeError(f"ComfyUI has failed and will not be restarted: {messages[0]}")
        raise RuntimeError("every ComfyUI instance has failed and will not be restarted: "
                           + "; ".join(f"{n}: {m.splitlines()[0] if m else 'failed'}" for n, m in enumerate(messages)))

    def _not_free_text(self, timeout: float) -> str:
        if len(self.instances) == 1:
            status = self.instances[0].handle.status()
            return f"ComfyUI was not ready within {timeout:g} s (state {status.state.value}: {status.message})"
        states = ", ".join(f"{i.label}: {i.state().value}" + (", busy" if i.running else "") for i in self.instances)
        return f"no ComfyUI instance was free and ready within {timeout:g} s ({states})"

    # --- reporting and closing ------------------------------------------------------------------------

    def running(self) -> int:
        return sum(i.running for i in self.instances)

    def describe(self) -> list[dict[str, Any]]:
        """Per instance (``/health``'s ``instances``): its status, and the jobs it runs now, completed and failed
        since the worker started."""
        return [{**describe_instance(i.label, i.engine.settings, i.handle.status()),
                 "jobs": {"inProgress": i.running, "completed": i.completed, "failed": i.failed}}
                for i in self.instances]

    async def close(self) -> None:
        await asyncio.gather(*(i.engine.close() for i in self.instances))
