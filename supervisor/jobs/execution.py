"""Running a job's prompt on one ComfyUI process: queue it, follow its events to the end, tell how it ended.

A :class:`PromptRun` is one attempt of a job on the process the supervisor reported when the job started
(its generation). It watches that process's exit the whole time, so a request that fails because ComfyUI died
says so (with the exit and the last log lines) instead of "not reachable". The websocket is opened before
``POST /prompt`` with the job's own client id; only this prompt's events count, and the end is ``executing``
with ``node: null``. A dropped websocket is reopened and ``/history`` checked for a missed end -- only while
the same process runs: if it died or was restarted, its queue and history are gone and the attempt fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any

import aiohttp

from supervisor.comfy.client import ComfyClient, PromptRejected
from supervisor.comfy.status import ComfyHandle, CrashInfo
from supervisor.config import Settings
from supervisor.errors import (
    EXECUTION_PREFIX,
    VALIDATION_PREFIX,
    ComfyUnavailableError,
    ExecutionError,
    ValidationError,
)
from supervisor.jobs.job import Job, Progress
from supervisor.jobs.preflight import NodeCatalog, node_label, render_node_errors, render_prompt_error

log = logging.getLogger("supervisor.jobs")

LOG_TAIL_LINES = 20
CRASH_NOTICE_S = 0.5  # after a failed request, how long to wait for the supervisor to report an exit
DRAIN_S = 0.05  # after an exit, how long to read what ComfyUI sent before it died
OOM_MARKERS = ("out of memory", "outofmemory", "oom")
OOM_ADVICE = (
    "reduce the image size (width/height), the batch size or the number of frames, or use a GPU with more memory"
)
WS_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)

WebSocket = aiohttp.ClientWebSocketResponse


class PromptRun:
    """One attempt of a job on one ComfyUI process; :meth:`stop` ends the watch on that process's exit."""

    def __init__(self, job: Job, client: ComfyClient, comfy: ComfyHandle, settings: Settings) -> None:
        self.job = job
        self.client = client
        self.comfy = comfy
        self.settings = settings
        self.exit_task: asyncio.Future[CrashInfo] = asyncio.ensure_future(comfy.wait_exit(job.generation))

    def stop(self) -> None:
        self.exit_task.cancel()

    async def call(self, call: Awaitable[Any]) -> Any:
        """Await a ComfyUI request; if it failed because ComfyUI died, say that instead of "not reachable"."""
        try:
            return await call
        except ComfyUnavailableError as unavailable:
            try:
                crash = await asyncio.wait_for(asyncio.shield(self.exit_task), CRASH_NOTICE_S)
            except TimeoutError:
                raise unavailable from None  # alive but not answering (e.g. stopped): "not reachable" it is
            raise self._crash_error(crash) from None

    # --- queueing and following the prompt ----------------------------------------------------------

    async def execute(self, graph: dict[str, Any], progress: Progress, catalog: NodeCatalog | None) -> None:
        """Queue ``graph`` and follow it to its end; raise the JobError that tells why it did not succeed."""
        job = self.job
        job.stage = "queueing the prompt"
        ws = await self.call(self.client.connect_ws(job.client_id))
        try:
            job.posted = True
            await self._queue(graph, catalog)
            job.stage = "waiting in ComfyUI's queue"
            await progress.emit({"stage": "queued"}, force=True)
            ws = await self._follow(ws, progress)
        finally:
            await ws.close()
        raise_for_outcome(job)

    async def _queue(self, graph: dict[str, Any], catalog: NodeCatalog | None) -> None:
        job = self.job
        try:
            answer = await self.call(self.client.queue_prompt(graph, job.client_id, job.prompt_id))
        except PromptRejected as exc:
            job.ended = True
            lines = render_prompt_error(exc.body, job.request.workflow, catalog)
            raise ValidationError.with_problems(VALIDATION_PREFIX, lines, {"comfy_error": exc.body}) from None
        job.accepted = True
        log.info("job %s: queued as prompt %s (queue number %s)", job.job_id, job.prompt_id, answer.get("number"))
        for line in render_node_errors(answer.get("node_errors"), job.request.workflow, catalog):
            job.warnings.append(f"{line} (ComfyUI skipped the outputs that depend on it)")

    async def _follow(self, ws: WebSocket, progress: Progress) -> WebSocket:
        """Read this prompt's events until its end; reconnect (same process only) when the socket drops."""
        while not self.job.ended:
            receive = asyncio.ensure_future(ws.receive())
            done, _ = await asyncio.wait({receive, self.exit_task}, return_when=asyncio.FIRST_COMPLETED)
            if self.exit_task in done:
                await self._drain(ws, receive, progress)
                raise self._crash_error(self.exit_task.result())
            msg = receive.result()
            if msg.type == aiohttp.WSMsgType.TEXT:
                await self._on_event(msg.json(), progress)
            elif msg.type in WS_CLOSED:
                await ws.close()
                ws = await self._reconnect()
        return ws

    async def _drain(self, ws: WebSocket, receive: asyncio.Future[Any], progress: Progress) -> None:
        """Read what ComfyUI sent before it died (e.g. which node it was running), so the message can say."""
        try:
            while True:
                msg = await asyncio.wait_for(asyncio.shield(receive), DRAIN_S)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                await self._on_event(msg.json(), progress)
                receive = asyncio.ensure_future(ws.receive())
        except (TimeoutError, ValueError, aiohttp.ClientError):
            return
        finally:
            receive.cancel()

    # --- events -------------------------------------------------------------------------------------

    async def _on_event(self, event: Any, progress: Progress) -> None:
        if not isinstance(event, Mapping) or not isinstance(event.get("data"), Mapping):
            return
        etype, data = event.get("type"), event["data"]
        if data.get("prompt_id") != self.job.prompt_id:
            return
        if etype == "execution_start":
            self.job.timestamps["comfy_execution_start"] = data.get("timestamp")
            self.job.stage = "starting the prompt"
            await progress.emit({"stage": "running"}, force=True)
        elif etype == "executing":
            await self._on_executing(data, progress)
        elif etype == "progress":
            await self._on_progress(data, progress)
        else:
            _record(self.job, etype, data)

    async def _on_executing(self, data: Mapping[str, Any], progress: Progress) -> None:
        job = self.job
        node = data.get("node")
        if node is None:
            job.ended = True
            return
        job.node = str(node)
        job.stage = f"running {job.node_text()}"
        await progress.emit({"stage": "running", "node": job.node, "node_type": _class_of(job, job.node)})

    async def _on_progress(self, data: Mapping[str, Any], progress: Progress) -> None:
        job = self.job
        node = str(data.get("node") or job.node or "")
        if node:
            job.node = node
            job.stage = f"running {job.node_text()}"
        await progress.emit({"stage": "running", "node": node or None, "node_type": _class_of(job, node),
                             "step": data.get("value"), "max": data.get("max")})

    # --- a dropped websocket, a dead process --------------------------------------------------------

    async def _reconnect(self) -> WebSocket:
        """Reopen the websocket while the same ComfyUI process runs; check /history for a missed end."""
        attempts = self.settings.websocket_reconnect_attempts
        delay = self.settings.websocket_reconnect_delay_s
        last_error = "it closed"
        for attempt in range(1, attempts + 1):
            await self._pause(delay if attempt > 1 else min(delay, 0.2))
            log.info("job %s: websocket dropped; reconnecting (%d/%d)", self.job.job_id, attempt, attempts)
            try:
                return await self._reopen()
            except ComfyUnavailableError as exc:
                last_error = exc.details.get("reason", exc.message)
        self._check_same_process()
        tried = f"{attempts} reconnection attempts failed ({last_error})" if attempts else (
            "reconnecting is off (WEBSOCKET_RECONNECT_ATTEMPTS=0)")
        raise ComfyUnavailableError(
            f"ComfyUI server ({self.client.host_port}) not reachable: the websocket dropped and {tried}"
        )

    async def _pause(self, delay_s: float) -> None:
        """Wait before a reconnection; fail at once if the process dies or was replaced meanwhile."""
        self._check_same_process()
        sleeper = asyncio.ensure_future(asyncio.sleep(delay_s))
        done, _ = await asyncio.wait({sleeper, self.exit_task}, return_when=asyncio.FIRST_COMPLETED)
        if self.exit_task in done:
            sleeper.cancel()
            raise self._crash_error(self.exit_task.result())
        self._check_same_process()

    async def _reopen(self) -> WebSocket:
        """A new websocket, and ``/history`` for an end that came while the old one was down."""
        ws = await self.client.connect_ws(self.job.client_id)
        try:
            entry = await self.client.history(self.job.prompt_id)
        except ComfyUnavailableError:
            await ws.close()
            raise
        if entry is not None:
            absorb_history(self.job, entry)
            self.job.ended = True
        return ws

    def _check_same_process(self) -> None:
        """Fail at once when the process the prompt was queued on is gone: its queue and history died with it."""
        if self.exit_task.done() and not self.exit_task.cancelled():
            raise self._crash_error(self.exit_task.result())
        if self.comfy.status().generation != self.job.generation:
            raise ComfyUnavailableError(
                "ComfyUI was restarted while running the job; its queue and history are lost",
                details={"log_tail": self.comfy.log_tail(LOG_TAIL_LINES)},
            )

    def _crash_error(self, crash: CrashInfo) -> ComfyUnavailableError:
        job = self.job
        job.crashed = crash
        job.ended = True  # its queue died with it: nothing to interrupt or delete
        lines = list(crash.last_lines) or self.comfy.log_tail(LOG_TAIL_LINES)
        where = f" while {job.stage}" if job.stage else ""
        return ComfyUnavailableError(
            f"ComfyUI stopped{where}: {crash.describe()}",
            details={"exit_code": crash.exit_code, "signal": crash.signal, "pid": crash.pid,
                     "log_tail": lines[-LOG_TAIL_LINES:]},
        )


# --- what ComfyUI told about the prompt -----------------------------------------------------------------


def _record(job: Job, etype: Any, data: Mapping[str, Any]) -> None:
    """The events that only leave a trace on the job: cached nodes, files written, how the prompt ended."""
    if etype == "execution_cached":
        job.cached.update(str(n) for n in data.get("nodes") or [])
    elif etype == "executed":
        output = data.get("output")
        if isinstance(output, Mapping):
            merged = job.executed.setdefault(str(data.get("node")), {})
            for key, items in output.items():
                if isinstance(items, list):
                    merged.setdefault(key, []).extend(items)
    elif etype == "execution_success":
        job.timestamps["comfy_execution_success"] = data.get("timestamp")
    elif etype == "execution_error":
        job.error = dict(data)
        job.timestamps["comfy_execution_error"] = data.get("timestamp")
    elif etype == "execution_interrupted":
        job.interrupted = dict(data)


def absorb_history(job: Job, entry: Mapping[str, Any]) -> None:
    """Take what the events would have told from a history entry (used after a reconnect)."""
    status = entry.get("status") if isinstance(entry.get("status"), Mapping) else {}
    for item in status.get("messages") or []:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[1], Mapping):
            kind, data = item
            if kind == "execution_start":
                job.timestamps["comfy_execution_start"] = data.get("timestamp")
            elif kind == "execution_success":
                job.timestamps["comfy_execution_success"] = data.get("timestamp")
            elif kind == "execution_cached":
                job.cached.update(str(n) for n in data.get("nodes") or [])
            elif kind == "execution_error":
                job.error = dict(data)
            elif kind == "execution_interrupted":
                job.interrupted = dict(data)


def raise_for_outcome(job: Job) -> None:
    """The prompt ended: raise if it failed in a node or was interrupted by someone else."""
    if job.error is not None:
        raise execution_error(job.error, job.request.workflow)
    if job.interrupted is not None:
        node = job.interrupted.get("node_id")
        raise ExecutionError(
            f"{EXECUTION_PREFIX}: the prompt was interrupted in ComfyUI before {job.node_text(node)} "
            "(someone called ComfyUI's /interrupt)",
            details={"comfy_interrupted": job.interrupted},
        )


def execution_error(data: Mapping[str, Any], graph: Mapping[str, Any]) -> ExecutionError:
    """``Workflow execution error: node 31 (KSampler) raised ValueError: ...`` (+ what to reduce on OOM)."""
    node_id = str(data.get("node_id") or "?")
    label = node_label(node_id, graph) if node_id in graph else f"node {node_id} ({data.get('node_type', '?')})"
    exc_type = str(data.get("exception_type") or "Exception")
    text = " ".join(str(data.get("exception_message") or "").split())
    first = text.split(" This error means", 1)[0].split(" TIPS:", 1)[0].strip()
    if len(first) > 400:
        first = first[:397] + "..."
    message = f"{EXECUTION_PREFIX}: {label} raised {exc_type}: {first}".rstrip(": ")
    blob = f"{exc_type} {text}".lower()
    if any(marker in blob for marker in OOM_MARKERS):
        message += f"; ComfyUI ran out of memory: {OOM_ADVICE}"
    details = {k: data.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message", "traceback",
                                        "executed")}
    return ExecutionError(message, details=details)


def _class_of(job: Job, node_id: str | None) -> str | None:
    node = job.request.workflow.get(node_id or "")
    return node.get("class_type") if isinstance(node, Mapping) else None
