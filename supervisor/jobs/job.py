"""One job's own state: what a run knows about itself, its result, and its throttled progress events.

Every step of the engine reads and writes the same :class:`Job` (its stage names the timeout message, its
flags tell the cleanup whether ComfyUI still holds the prompt), so it lives apart from the steps themselves.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.comfy.status import CrashInfo
from supervisor.jobs.inputs import JOB_FOLDER_PREFIX
from supervisor.jobs.outputs import JobOutput
from supervisor.jobs.preflight import node_label
from supervisor.jobs.request import JobRequest

log = logging.getLogger("supervisor.jobs")

ProgressCallback = Callable[[dict[str, Any]], Awaitable[None] | None]

PROGRESS_CALLBACK_TIMEOUT_S = 5.0


@dataclass
class JobResult:
    """A finished job: its outputs in order, non-fatal problems, and where the time went."""

    job_id: str
    prompt_id: str
    outputs: list[JobOutput]
    errors: list[str]
    timings: dict[str, float]
    response_format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "prompt_id": self.prompt_id,
            "outputs": [o.to_dict() for o in self.outputs],
            "errors": list(self.errors),
            "timings": dict(self.timings),
            "response_format": self.response_format,
        }


@dataclass
class Job:
    """Everything one run knows about itself; the timeout message is built from ``stage``."""

    job_id: str
    request: JobRequest
    folder: str
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    stage: str = "reading the input images"
    generation: int | None = None
    pid: int | None = None
    posted: bool = False  # POST /prompt was sent (it may be queued even if we never saw the answer)
    accepted: bool = False  # ComfyUI answered 200
    ended: bool = False  # ComfyUI is done with the prompt (end signal, history, or gone from the queue)
    crashed: CrashInfo | None = None
    node: str | None = None
    cached: set[str] = field(default_factory=set)
    executed: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    interrupted: dict[str, Any] | None = None
    timestamps: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra_files: list[Path] = field(default_factory=list)  # reported files outside the job folder, to delete

    def node_text(self, node_id: str | None = None) -> str:
        node_id = node_id or self.node
        return node_label(node_id, self.request.workflow) if node_id else "?"

    def never_started(self) -> bool:
        """ComfyUI died before this prompt began executing: nothing of it ran, so running it again is safe."""
        return self.crashed is not None and "comfy_execution_start" not in self.timestamps and self.node is None

    def next_attempt(self) -> None:
        """Forget the dead process's prompt; the folder, inputs and warnings stay."""
        self.client_id, self.prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
        self.posted = self.accepted = self.ended = False
        self.crashed = self.error = self.interrupted = None
        self.cached.clear()
        self.executed.clear()


def job_folder(job_id: str) -> str:
    """The job's own subfolder name in ComfyUI's input and output folders: safe, short, unique."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", job_id)[:48] or "job"
    return f"{JOB_FOLDER_PREFIX}{safe}-{uuid.uuid4().hex[:8]}"


class Progress:
    """Throttles progress events to one per PROGRESS_INTERVAL_S; a failing callback never fails the job."""

    def __init__(self, callback: ProgressCallback | None, interval_s: float, job: Job) -> None:
        self.callback = callback
        self.interval_s = interval_s
        self.job = job
        self.last = 0.0
        self.started = time.monotonic()

    async def emit(self, event: dict[str, Any], force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if not force and now - self.last < self.interval_s:
            return
        self.last = now
        event = {"job_id": self.job.job_id, "elapsed_s": round(now - self.started, 3), **event}
        try:
            result = self.callback(event)
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, PROGRESS_CALLBACK_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a progress consumer's bug is not the job's failure
            log.warning("progress callback failed for job %s", self.job.job_id, exc_info=True)
