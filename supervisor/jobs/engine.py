"""The job engine: run one workflow on ComfyUI, from a request's inputs to its outputs.

``JobEngine.run_job(job_id, request, on_progress)`` is the whole life of a job, independent of how it arrived
(RunPod or the self-hosted API):

1. parse the request (:mod:`supervisor.jobs.request`) and resolve its images -- decoded, downloaded through the
   SSRF guard, verified (:mod:`supervisor.jobs.inputs`). A bad input fails here, before ComfyUI hears of the job;
2. wait until the supervisor says ComfyUI is serving, and note which process (generation) that is;
3. preflight against ``/object_info`` (:mod:`supervisor.jobs.preflight`): node classes, installed models, images
   that were neither supplied nor present; unknown inputs become warnings;
4. upload the images into ``input/<job folder>/``, rewrite the inputs naming them, and give every output
   node's ``filename_prefix`` the job folder, so outputs are isolated, cleanup is one folder and ComfyUI's
   cache cannot replay a file of an earlier job;
5. open the websocket with a client id of the job's own, then ``POST /prompt``; follow the events of this
   prompt only (progress to ``on_progress``, throttled) until ``executing`` with ``node: null``. A dropped
   websocket is reopened and ``/history`` checked -- only while the supervisor reports the same ComfyUI
   process; if ComfyUI died or was restarted the job fails at once with the exit and its last log lines;
6. read every reported file from disk in workflow order, re-encode if asked, return base64 or upload to the
   bucket and return presigned URLs; refuse results over MAX_OUTPUT_BYTES when there is no bucket;
7. remove the job's input and output folders (unless KEEP_OUTPUTS).

The deadline (``timeout_s``) and cancellation of the task both interrupt the running prompt or delete the
queued one, wait (bounded) until ComfyUI has let go of it, clean up, and then fail with
:class:`~supervisor.errors.JobTimeoutError` or re-raise ``CancelledError``. Every failure is one
:class:`~supervisor.errors.JobError`; nothing else escapes.

The worker never knows whether it talks to ComfyUI or to the test stand-in.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from supervisor.comfy.client import ComfyClient, ComfyUploadError, PromptRejected
from supervisor.config import Settings
from supervisor.errors import (
    EXECUTION_PREFIX,
    UPLOAD_PREFIX,
    VALIDATION_PREFIX,
    ComfyUnavailableError,
    ExecutionError,
    InternalError,
    InvalidInputError,
    JobError,
    JobTimeoutError,
    OutputTooLargeError,
    ValidationError,
)
from supervisor.jobs.inputs import ComfyDirs, ResolvedInputs, comfy_dirs, resolve_inputs
from supervisor.jobs.netguard import GuardedFetcher
from supervisor.jobs.outputs import (
    JobOutput,
    LoadedFile,
    OutputRef,
    collect_refs,
    encode,
    load_files,
    merge_ui_outputs,
    serialised_size,
)
from supervisor.jobs.preflight import NodeCatalog, node_label, preflight, render_node_errors, render_prompt_error
from supervisor.jobs.request import JobRequest, parse_request
from supervisor.comfy.status import ComfyHandle, CrashInfo, Status
from supervisor.jobs.storage import BucketStorage, Upload

log = logging.getLogger("supervisor.jobs")

ProgressCallback = Callable[[dict[str, Any]], Awaitable[None] | None]

REQUEUES = 1  # a job whose ComfyUI died before the job started is queued again on the restarted one, once
CANCEL_GRACE_S = 10.0  # how long late cleanups may still run when the engine closes
TAKE_BACK_S = 3.0  # how long a job that gave up waits for ComfyUI to let go of its prompt (late cleanup does the rest)
ABANDON_POLL_S = 0.1
REINTERRUPT_S = 1.0  # an interrupt posted between two prompts is lost: repeat it while the prompt still runs
LATE_CLEANUP_POLL_S = 1.0
PROGRESS_CALLBACK_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 20
CRASH_NOTICE_S = 0.5
DRAIN_S = 0.05  # after a failed request, how long to wait for the supervisor to report an exit
OOM_MARKERS = ("out of memory", "outofmemory", "oom")
OOM_ADVICE = (
    "reduce the image size (width/height), the batch size or the number of frames, or use a GPU with more memory"
)


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
class _Job:
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


class _Progress:
    """Throttles progress events to one per PROGRESS_INTERVAL_S; a failing callback never fails the job."""

    def __init__(self, callback: ProgressCallback | None, interval_s: float, job: _Job) -> None:
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


class JobEngine:
    """Runs jobs on the supervised ComfyUI. One per worker; safe for concurrent ``run_job`` calls."""

    def __init__(self, settings: Settings, comfy: ComfyHandle) -> None:
        self.settings = settings
        self.comfy = comfy
        self.dirs: ComfyDirs = comfy_dirs(settings)
        self._session: aiohttp.ClientSession | None = None
        self._client: ComfyClient | None = None
        self._fetcher: GuardedFetcher | None = None
        self._storage = BucketStorage(settings) if settings.s3_enabled else None
        self._catalog: NodeCatalog | None = None
        self._catalog_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()

    # --- lifecycle -----------------------------------------------------------------------------------

    @property
    def client(self) -> ComfyClient:
        if self._client is None or self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(trust_env=False)
            self._client = ComfyClient(self._session, self.comfy.base_url)
        return self._client

    @property
    def fetcher(self) -> GuardedFetcher | None:
        if not self.settings.allow_url_inputs:
            return None
        if self._fetcher is None:
            self._fetcher = GuardedFetcher(self.settings.url_input_allowlist, timeout_s=self.settings.url_input_timeout_s)
        return self._fetcher

    async def close(self) -> None:
        """Finish late cleanups (bounded), then close the sessions."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=CANCEL_GRACE_S)
            for task in self._background:
                task.cancel()
        if self._fetcher is not None:
            await self._fetcher.close()
        if self._storage is not None:
            await self._storage.close()
        if self._session is not None:
            await self._session.close()
        self._session = self._client = self._fetcher = None

    # --- the job ------------------------------------------------------------------------------------

    async def run_job(
        self, job_id: str, request: Mapping[str, Any] | JobRequest | Any, on_progress: ProgressCallback | None = None
    ) -> JobResult:
        """Run one job to its result, or raise one JobError (CancelledError when the task is cancelled)."""
        started = time.monotonic()
        try:
            req = request if isinstance(request, JobRequest) else parse_request(request, self.settings)
            job = _Job(job_id=job_id, request=req, folder=job_folder(job_id))
            return await self._run(job, on_progress, started)
        except (JobError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job_id)
            raise InternalError(f"Internal error of the worker: {type(exc).__name__}: {exc}") from exc

    async def _run(self, job: _Job, on_progress: ProgressCallback | None, started: float) -> JobResult:
        try:
            result = await self._run_steps(job, on_progress, started)
        except JobError as err:
            err.warnings.extend(w for w in (*job.request.warnings, *job.warnings) if w not in err.warnings)
            log.warning("job %s failed (%s): %s", job.job_id, err.kind, err.message)
            raise
        except asyncio.CancelledError:
            log.info("job %s cancelled while %s", job.job_id, job.stage)
            raise
        log.info("job %s: %d output(s) in %.2f s", job.job_id, len(result.outputs), result.timings["total_s"])
        return result

    async def _run_steps(self, job: _Job, on_progress: ProgressCallback | None, started: float) -> JobResult:
        progress = _Progress(on_progress, self.settings.progress_interval_s, job)
        timings: dict[str, float] = {}
        exit_task: asyncio.Future[CrashInfo] | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + job.request.timeout_s
        timeout = asyncio.timeout_at(deadline)
        try:
            try:
                async with timeout:
                    resolved = await resolve_inputs(job.request, self.settings, self.fetcher)
                    timings["inputs_s"] = time.monotonic() - started
                    for attempt in range(REQUEUES + 1):
                        job.stage = "waiting for ComfyUI to be ready"
                        status = await self._wait_ready(job, deadline - loop.time())
                        if exit_task is not None:
                            exit_task.cancel()
                        exit_task = asyncio.ensure_future(self.comfy.wait_exit(status.generation))
                        try:
                            graph = await self._prepare(job, resolved, status, exit_task)
                            mark = time.monotonic()
                            await self._execute(job, graph, progress, exit_task)
                            timings["comfy_s"] = time.monotonic() - mark
                            break
                        except ComfyUnavailableError as err:
                            if attempt == REQUEUES or not job.never_started():
                                raise
                            self._requeue(job, err)
            except TimeoutError:
                if not timeout.expired():
                    raise
                await self._abandon(job)
                raise JobTimeoutError(
                    f"Job timed out after {job.request.timeout_s:g} s while {job.stage}",
                    details={"prompt_id": job.prompt_id, "node": job.node},
                ) from None
            except asyncio.CancelledError:
                await _shielded(self._abandon(job))
                raise
            except Exception:  # a JobError, or a bug: either way ComfyUI must let go of the prompt
                await self._abandon(job)
                raise
            mark = time.monotonic()
            job.stage = "collecting the outputs"
            outputs = await self._collect(job)
            timings["outputs_s"] = time.monotonic() - mark
        finally:
            if exit_task is not None:
                exit_task.cancel()
            await _shielded(self._cleanup(job))
        timings["total_s"] = time.monotonic() - started
        timings.update(job.timestamps)
        return JobResult(
            job_id=job.job_id,
            prompt_id=job.prompt_id,
            outputs=outputs,
            errors=list(job.request.warnings) + job.warnings,
            timings={k: round(v, 4) if isinstance(v, float) else v for k, v in timings.items()},
            response_format=job.request.response_format,
        )

    @staticmethod
    def _requeue(job: _Job, err: ComfyUnavailableError) -> None:
        log.warning("job %s: %s; the job had not started, so it is queued again once ComfyUI is back",
                    job.job_id, err.message)
        job.warnings.append(f"ComfyUI restarted before this job started ({err.message}); it was queued again")
        job.next_attempt()

    async def _wait_ready(self, job: _Job, timeout_s: float) -> Status:
        try:
            status = await self.comfy.wait_ready(max(timeout_s, 0.001))
        except RuntimeError as exc:
            raise self.client.unreachable(f"the supervisor is not serving ({exc})") from None
        except TimeoutError:
            raise JobTimeoutError(
                f"Job timed out after {job.request.timeout_s:g} s while waiting for ComfyUI to be ready",
                details={"state": self.comfy.status().state.value},
            ) from None
        job.generation, job.pid = status.generation, status.pid
        return status

    # --- before queueing ----------------------------------------------------------------------------

    async def _prepare(
        self, job: _Job, resolved: ResolvedInputs, status: Status, exit_task: asyncio.Future[CrashInfo]
    ) -> dict[str, Any]:
        """Preflight, upload the inputs, and return the graph to queue (rewritten for this job)."""
        job.stage = "checking the workflow"
        graph = job.request.workflow
        catalog = await self._catalog_for(job, status.generation, exit_task)
        takes_string = {k for k in resolved.inline if catalog.input_type(graph[k[0]]["class_type"], k[1]) == "STRING"}
        resolved = resolved.without_inline(takes_string)
        report = self._preflight(graph, catalog, resolved, status)
        if report.missing_names:
            catalog = await self._catalog_for(job, status.generation, exit_task, refresh=True)
            report = self._preflight(graph, catalog, resolved, status)
        job.warnings.extend(w for w in report.warnings if w not in job.warnings)  # (again, on a requeue)
        if report.problems:
            raise ValidationError.with_problems(VALIDATION_PREFIX, report.problems)
        job.stage = "uploading the input images"
        uploaded = await self._upload(job, resolved, exit_task)
        graph = rewrite_inputs(graph, resolved, uploaded)
        graph, unprefixed = rewrite_prefixes(graph, job.folder)
        for node_id in unprefixed:
            warning = (
                f"{job.node_text(node_id)} takes its filename_prefix from another node, so its files are not in the "
                "job's own folder; they are read from what ComfyUI reports and deleted afterwards"
            )
            if warning not in job.warnings:
                job.warnings.append(warning)
        return graph

    def _preflight(self, graph: dict[str, Any], catalog: NodeCatalog, resolved: ResolvedInputs, status: Status) -> Any:
        return preflight(
            graph, catalog, supplied=[img.name for img in resolved.files if img.origin.startswith("images[")],
            inline=resolved.inline.keys(), dirs=self.dirs, import_failures=status.import_failures,
        )

    async def _catalog_for(
        self, job: _Job, generation: int, exit_task: asyncio.Future[CrashInfo], refresh: bool = False
    ) -> NodeCatalog:
        """``/object_info``, fetched once per ComfyUI process and again when asked (a name was not found)."""
        async with self._catalog_lock:
            current = self._catalog
            if current is None or current.generation != generation or refresh:
                info = await self._comfy_call(job, self.client.object_info(), exit_task)
                self._catalog = NodeCatalog(info, generation)
            return self._catalog

    async def _upload(self, job: _Job, resolved: ResolvedInputs, exit_task: asyncio.Future[CrashInfo]) -> dict[str, str]:
        """Upload every input into the job's folder; name -> the value LoadImage must hold."""
        if not resolved.files:
            return {}

        async def one(name: str, data: bytes) -> str:
            return await self.client.upload_image(data, name, job.folder)

        try:
            refs = await self._comfy_call(job, asyncio.gather(*(one(f.name, f.data) for f in resolved.files)), exit_task)
        except ComfyUploadError as exc:
            raise InvalidInputError(f"{UPLOAD_PREFIX}: {exc}") from None
        return {f.name: ref for f, ref in zip(resolved.files, refs)}

    # --- queueing and following the prompt ----------------------------------------------------------

    async def _execute(
        self, job: _Job, graph: dict[str, Any], progress: _Progress, exit_task: asyncio.Future[CrashInfo]
    ) -> None:
        job.stage = "queueing the prompt"
        ws = await self._comfy_call(job, self.client.connect_ws(job.client_id), exit_task)
        try:
            job.posted = True
            try:
                answer = await self._comfy_call(
                    job, self.client.queue_prompt(graph, job.client_id, job.prompt_id), exit_task
                )
            except PromptRejected as exc:
                job.ended = True
                lines = render_prompt_error(exc.body, job.request.workflow, self._catalog)
                raise ValidationError.with_problems(VALIDATION_PREFIX, lines, {"comfy_error": exc.body}) from None
            job.accepted = True
            log.info("job %s: queued as prompt %s (queue number %s)", job.job_id, job.prompt_id, answer.get("number"))
            for line in render_node_errors(answer.get("node_errors"), job.request.workflow, self._catalog):
                job.warnings.append(f"{line} (ComfyUI skipped the outputs that depend on it)")
            job.stage = "waiting in ComfyUI's queue"
            await progress.emit({"stage": "queued"}, force=True)
            ws = await self._follow(job, ws, progress, exit_task)
        finally:
            await ws.close()
        self._raise_for_outcome(job)

    async def _follow(
        self,
        job: _Job,
        ws: aiohttp.ClientWebSocketResponse,
        progress: _Progress,
        exit_task: asyncio.Future[CrashInfo],
    ) -> aiohttp.ClientWebSocketResponse:
        """Read this prompt's events until its end; reconnect (same process only) when the socket drops."""
        while not job.ended:
            receive = asyncio.ensure_future(ws.receive())
            done, _ = await asyncio.wait({receive, exit_task}, return_when=asyncio.FIRST_COMPLETED)
            if exit_task in done:
                await self._drain(job, ws, receive, progress)
                raise self._crash_error(job, exit_task.result())
            msg = receive.result()
            if msg.type == aiohttp.WSMsgType.TEXT:
                await self._on_event(job, msg.json(), progress)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                              aiohttp.WSMsgType.ERROR):
                await ws.close()
                ws = await self._reconnect(job, exit_task)
        return ws

    async def _drain(
        self, job: _Job, ws: aiohttp.ClientWebSocketResponse, receive: asyncio.Future[Any], progress: _Progress
    ) -> None:
        """Read what ComfyUI sent before it died (e.g. which node it was running), so the message can say."""
        try:
            while True:
                msg = await asyncio.wait_for(asyncio.shield(receive), DRAIN_S)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                await self._on_event(job, msg.json(), progress)
                receive = asyncio.ensure_future(ws.receive())
        except (TimeoutError, ValueError, aiohttp.ClientError):
            return
        finally:
            receive.cancel()

    async def _on_event(self, job: _Job, event: Any, progress: _Progress) -> None:
        if not isinstance(event, Mapping) or not isinstance(event.get("data"), Mapping):
            return
        etype, data = event.get("type"), event["data"]
        if data.get("prompt_id") != job.prompt_id:
            return
        if etype == "execution_start":
            job.timestamps["comfy_execution_start"] = data.get("timestamp")
            job.stage = "starting the prompt"
            await progress.emit({"stage": "running"}, force=True)
        elif etype == "execution_cached":
            job.cached.update(str(n) for n in data.get("nodes") or [])
        elif etype == "executing":
            node = data.get("node")
            if node is None:
                job.ended = True
                return
            job.node = str(node)
            job.stage = f"running {job.node_text()}"
            await progress.emit({"stage": "running", "node": job.node, "node_type": self._class_of(job, job.node)})
        elif etype == "progress":
            node = str(data.get("node") or job.node or "")
            if node:
                job.node = node
                job.stage = f"running {job.node_text()}"
            await progress.emit({"stage": "running", "node": node or None, "node_type": self._class_of(job, node),
                                 "step": data.get("value"), "max": data.get("max")})
        elif etype == "executed":
            node = str(data.get("node"))
            output = data.get("output")
            if isinstance(output, Mapping):
                merged = job.executed.setdefault(node, {})
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

    @staticmethod
    def _class_of(job: _Job, node_id: str | None) -> str | None:
        node = job.request.workflow.get(node_id or "")
        return node.get("class_type") if isinstance(node, Mapping) else None

    async def _reconnect(self, job: _Job, exit_task: asyncio.Future[CrashInfo]) -> aiohttp.ClientWebSocketResponse:
        """Reopen the websocket while the same ComfyUI process runs; check /history for a missed end."""
        attempts = self.settings.websocket_reconnect_attempts
        delay = self.settings.websocket_reconnect_delay_s
        last_error = "it closed"
        for attempt in range(1, attempts + 1):
            self._check_same_process(job, exit_task)
            sleeper = asyncio.ensure_future(asyncio.sleep(delay if attempt > 1 else min(delay, 0.2)))
            done, _ = await asyncio.wait({sleeper, exit_task}, return_when=asyncio.FIRST_COMPLETED)
            if exit_task in done:
                sleeper.cancel()
                raise self._crash_error(job, exit_task.result())
            self._check_same_process(job, exit_task)
            log.info("job %s: websocket dropped; reconnecting (%d/%d)", job.job_id, attempt, attempts)
            try:
                ws = await self.client.connect_ws(job.client_id)
            except ComfyUnavailableError as exc:
                last_error = exc.details.get("reason", exc.message)
                continue
            try:
                entry = await self.client.history(job.prompt_id)
            except ComfyUnavailableError as exc:
                await ws.close()
                last_error = exc.details.get("reason", exc.message)
                continue
            if entry is not None:
                self._absorb_history(job, entry)
                job.ended = True
            return ws
        self._check_same_process(job, exit_task)
        tried = f"{attempts} reconnection attempts failed ({last_error})" if attempts else (
            "reconnecting is off (WEBSOCKET_RECONNECT_ATTEMPTS=0)")
        raise ComfyUnavailableError(
            f"ComfyUI server ({self.client.host_port}) not reachable: the websocket dropped and {tried}"
        )

    def _check_same_process(self, job: _Job, exit_task: asyncio.Future[CrashInfo]) -> None:
        """Fail at once when the process the prompt was queued on is gone: its queue and history died with it."""
        if exit_task.done() and not exit_task.cancelled():
            raise self._crash_error(job, exit_task.result())
        status = self.comfy.status()
        if status.generation != job.generation:
            raise ComfyUnavailableError(
                "ComfyUI was restarted while running the job; its queue and history are lost",
                details={"log_tail": self.comfy.log_tail(LOG_TAIL_LINES)},
            )

    def _absorb_history(self, job: _Job, entry: Mapping[str, Any]) -> None:
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

    def _raise_for_outcome(self, job: _Job) -> None:
        if job.error is not None:
            raise execution_error(job.error, job.request.workflow)
        if job.interrupted is not None:
            node = job.interrupted.get("node_id")
            raise ExecutionError(
                f"{EXECUTION_PREFIX}: the prompt was interrupted in ComfyUI before {job.node_text(node)} "
                "(someone called ComfyUI's /interrupt)",
                details={"comfy_interrupted": job.interrupted},
            )

    def _crash_error(self, job: _Job, crash: CrashInfo) -> ComfyUnavailableError:
        job.crashed = crash
        job.ended = True  # its queue died with it: nothing to interrupt or delete
        lines = list(crash.last_lines) or self.comfy.log_tail(LOG_TAIL_LINES)
        where = f" while {job.stage}" if job.stage else ""
        return ComfyUnavailableError(
            f"ComfyUI stopped{where}: {crash.describe()}",
            details={"exit_code": crash.exit_code, "signal": crash.signal, "pid": crash.pid,
                     "log_tail": lines[-LOG_TAIL_LINES:]},
        )

    async def _comfy_call(self, job: _Job, call: Awaitable[Any], exit_task: asyncio.Future[CrashInfo]) -> Any:
        """Await a ComfyUI request; if it failed because ComfyUI died, say that instead of "not reachable"."""
        try:
            return await call
        except ComfyUnavailableError as unavailable:
            try:
                crash = await asyncio.wait_for(asyncio.shield(exit_task), CRASH_NOTICE_S)
            except TimeoutError:
                raise unavailable from None  # alive but not answering (e.g. stopped): "not reachable" it is
            raise self._crash_error(job, crash) from None

    # --- outputs ------------------------------------------------------------------------------------

    async def _collect(self, job: _Job) -> list[JobOutput]:
        try:
            entry = await self.client.history(job.prompt_id)
        except ComfyUnavailableError:
            entry = None  # the events already told which files were written
        if entry is not None:
            self._absorb_history(job, entry)
        ui = merge_ui_outputs(entry.get("outputs") if entry else None, job.executed)
        refs = collect_refs(ui, job.request.workflow, job.cached)
        job.extra_files = self._files_to_delete(job, refs)
        req = job.request
        files, warnings = await load_files(refs, self.dirs, include_temp=req.include_temp,
                                           image_format=req.image_format, quality=req.image_quality,
                                           graph=req.workflow)
        job.warnings.extend(warnings)
        if not files:
            job.warnings.append("the workflow finished but produced no output files")
        if self._storage is not None:
            urls = await self._storage.upload_all(job.job_id, [Upload(f.filename, f.data, f.media_type) for f in files])
            return [_output(f, url, "s3_url") for f, url in zip(files, urls)]
        size = serialised_size(files, job.request.warnings + tuple(job.warnings))
        if size > self.settings.max_output_bytes:
            raise OutputTooLargeError(
                f"Output too large: about {_mb(size)} as base64, over the {_mb(self.settings.max_output_bytes)} "
                "limit (MAX_OUTPUT_BYTES); configure a bucket (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
                "BUCKET_SECRET_ACCESS_KEY) to receive URLs instead, or choose image_format jpeg or webp",
                details={"estimated_bytes": size, "files": len(files)},
            )
        encoded = await asyncio.gather(*(asyncio.to_thread(encode, f.data) for f in files))
        return [_output(f, data, "base64") for f, data in zip(files, encoded)]

    def _files_to_delete(self, job: _Job, refs: list[OutputRef]) -> list[Path]:
        """Reported files outside the job folder that this prompt wrote (cached ones belong to earlier jobs)."""
        paths = []
        for ref in refs:
            if ref.cached or ref.subfolder.split("/", 1)[0] == job.folder and ref.type == "output":
                continue
            path = ref.path(self.dirs)
            if path is not None:
                paths.append(path)
        return paths

    # --- ending -------------------------------------------------------------------------------------

    async def _abandon(self, job: _Job) -> None:
        """Take the prompt back from ComfyUI: delete it if queued, interrupt it if running; wait, bounded.

        If ComfyUI does not let go within TAKE_BACK_S (or cannot be reached), the job still ends; its folders
        are then removed later, once the prompt has left (see :meth:`_cleanup`).
        """
        if not job.posted or job.ended or job.crashed is not None:
            return
        try:
            async with asyncio.timeout(TAKE_BACK_S):
                await self._take_back(job)
                return
        except ComfyUnavailableError as exc:
            why = f"ComfyUI did not answer ({exc.details.get('reason', exc.message)})"
        except TimeoutError:
            why = f"it was still in ComfyUI after {TAKE_BACK_S:g} s"
        log.warning("job %s: could not take prompt %s back: %s; its files are removed once it leaves",
                    job.job_id, job.prompt_id, why)

    async def _take_back(self, job: _Job) -> None:
        """Poll ``/queue`` (only here, after the job gave up on the prompt) until the prompt is gone."""
        loop = asyncio.get_running_loop()
        last_interrupt = 0.0
        absent_since: float | None = None
        while True:
            state = await self.client.prompt_state(job.prompt_id)
            if state == "pending":
                await self.client.delete_queued([job.prompt_id])
            elif state == "running" and loop.time() - last_interrupt >= REINTERRUPT_S:
                await self.client.interrupt(job.prompt_id)
                last_interrupt = loop.time()
            if state != "absent":
                absent_since = None
            else:
                # a POST still in flight may queue it a moment later: make sure it stays gone
                absent_since = absent_since or loop.time()
                if job.accepted or loop.time() - absent_since > 1.0:
                    job.ended = True
                    return
            await asyncio.sleep(ABANDON_POLL_S)

    async def _cleanup(self, job: _Job) -> None:
        """Remove the job's folders now, or once ComfyUI lets go of the prompt."""
        if self.settings.keep_outputs:
            return
        if job.posted and not job.ended and job.crashed is None:
            task = asyncio.get_running_loop().create_task(self._late_cleanup(job))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        await asyncio.to_thread(self._remove_files, job)

    async def _late_cleanup(self, job: _Job) -> None:
        """Wait until ComfyUI no longer holds the prompt (or that process is gone), then remove the folders.

        Removing them while the prompt still runs would let its SaveImage write into a folder nobody cleans.
        """
        loop = asyncio.get_running_loop()
        limit = loop.time() + self.settings.max_job_timeout_s
        try:
            while loop.time() < limit:
                try:
                    if await self.client.prompt_state(job.prompt_id) == "absent":
                        break
                except ComfyUnavailableError:
                    if self.comfy.status().generation != job.generation:
                        break  # that process and its queue are gone
                await asyncio.sleep(LATE_CLEANUP_POLL_S)
        finally:
            await asyncio.to_thread(self._remove_files, job)

    def _remove_files(self, job: _Job) -> None:
        for root in (self.dirs.input, self.dirs.output):
            shutil.rmtree(root / job.folder, ignore_errors=True)
        if not job.extra_files and job.executed:  # failed before reading outputs: what the events reported
            job.extra_files = self._files_to_delete(job, collect_refs(job.executed, job.request.workflow, job.cached))
        for path in job.extra_files:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                log.warning("could not delete %s", path)


def job_folder(job_id: str) -> str:
    """The job's own subfolder name in ComfyUI's input and output folders: safe, short, unique."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", job_id)[:48] or "job"
    return f"job-{safe}-{uuid.uuid4().hex[:8]}"


def rewrite_inputs(graph: Mapping[str, Any], resolved: ResolvedInputs, uploaded: Mapping[str, str]) -> dict[str, Any]:
    """Inline images become their uploaded file; every string input equal to a supplied name, its upload."""
    out: dict[str, Any] = {}
    for node_id, node in graph.items():
        inputs = dict(node["inputs"])
        for name, value in inputs.items():
            if not isinstance(value, str):
                continue
            if (node_id, name) in resolved.inline:
                inputs[name] = uploaded[resolved.inline[(node_id, name)]]
            elif value in uploaded:
                inputs[name] = uploaded[value]
            elif value.endswith(" [input]") and value[: -len(" [input]")] in uploaded:
                inputs[name] = uploaded[value[: -len(" [input]")]]
        out[node_id] = {**node, "inputs": inputs}
    return out


def rewrite_prefixes(graph: Mapping[str, Any], folder: str) -> tuple[dict[str, Any], list[str]]:
    """Put every ``filename_prefix`` under the job folder; the ids of nodes whose prefix is a link."""
    out: dict[str, Any] = {}
    linked: list[str] = []
    for node_id, node in graph.items():
        inputs = node["inputs"]
        value = inputs.get("filename_prefix")
        if isinstance(value, str):
            parts = [p for p in re.split(r"[\\/]+", value) if p not in ("", ".", "..")]
            inputs = {**inputs, "filename_prefix": "/".join([folder, *(parts or ["ComfyUI"])])}
        elif isinstance(value, list):
            linked.append(node_id)
        out[node_id] = {**node, "inputs": inputs}
    return out, linked


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


def _output(f: LoadedFile, data: str, kind: str) -> JobOutput:
    return JobOutput(filename=f.filename, node_id=f.ref.node_id, media_type=f.media_type, size=len(f.data),
                     data=data, kind=kind, type=f.ref.type)  # type: ignore[arg-type]


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


async def _shielded(coro: Awaitable[Any]) -> Any:
    """Run cleanup to its end even if the job's task is cancelled again meanwhile."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task}, timeout=CANCEL_GRACE_S + 2)
        raise
