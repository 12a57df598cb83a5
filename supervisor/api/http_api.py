"""The self-hosted front door: an HTTP API with RunPod's endpoint contract, so a RunPod client works unchanged.

Routes (also under ``/v2/{endpoint_id}/``, so a RunPod URL works by changing only the host):

* ``POST /run`` -> ``{"id", "status": "IN_QUEUE"}``; ``POST /runsync`` waits up to ``RUNSYNC_WAIT_S`` (or
  ``?wait=<ms>``) and answers the finished job, or its id and current status;
* ``GET|POST /status/{id}``, ``POST /cancel/{id}``, ``GET|POST /stream/{id}``, ``POST /purge-queue``;
* ``GET /health`` (no auth): RunPod's ``jobs``/``workers`` counts plus ``comfyui`` (the supervisor's status),
  503 while ComfyUI is not serving;
* ``GET /workflows``: the named workflows and their parameters;
* the ComfyUI Deploy facade (seed 004), see :mod:`supervisor.api.deploy`.

Every answer is JSON. A job body is RunPod's: ``id``, ``status`` (``IN_QUEUE``, ``IN_PROGRESS``, ``COMPLETED``,
``FAILED``, ``CANCELLED``, ``TIMED_OUT``), ``delayTime``/``executionTime`` in ms once it ran, and ``output``
or ``error`` (see :mod:`supervisor.api.formats`). Jobs are journaled (:mod:`supervisor.api.journal`); up to
``MAX_CONCURRENCY`` run at once, at most ``MAX_QUEUE`` wait (429 beyond), finished ones are kept
``JOB_RETENTION_S``. A ``webhook`` in the request receives the final job body by POST, through the SSRF guard.

SIGTERM: no new jobs (503), the queue is kept for the next start, running jobs get ``SHUTDOWN_GRACE_S`` to
finish; any still running then is FAILED saying so.

Reference for clients: ``docs/api.md``.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from supervisor.config import Settings
from supervisor.errors import InternalError, JobError
from supervisor.api.formats import CANCELLED, COMPLETED, FAILED, Outcome, failure, requested_format, success
from supervisor.api.journal import IN_PROGRESS, IN_QUEUE, RESTARTED_MESSAGE, JobRecord, Journal
from supervisor.jobs.netguard import FetchError, GuardedFetcher, URLRefused, redact_url
from supervisor.comfy.status import State
from supervisor.api.workflows import WorkflowLibrary, prepare_input

log = logging.getLogger("supervisor.api")

EXIT_OK = 0
EXIT_FAILED = 1

WEBHOOK_ATTEMPTS = 3
WEBHOOK_DELAY_S = 2.0
WEBHOOK_TIMEOUT_S = 10.0
PURGE_INTERVAL_S = 60.0
MAX_STREAM_ITEMS = 1000
MAX_RUNSYNC_WAIT_S = 300.0
SHUTDOWN_MESSAGE = "the worker shut down before the job finished (SHUTDOWN_GRACE_S={grace:g} s passed)"

InputHook = Callable[[Any, "Job"], Awaitable[Any]]


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


def is_loopback(host: str) -> bool:
    """Whether ``API_HOST`` only listens on this machine (an unauthenticated API is only safe there)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def auth_refusal(settings: Settings) -> str | None:
    """Why the API must not start as configured, or None."""
    if settings.api_key or settings.allow_unauthenticated or is_loopback(settings.api_host):
        return None
    return (
        f"refusing to serve the API on {settings.api_host}:{settings.api_port} without authentication: set API_KEY "
        "(clients then send 'Authorization: Bearer <API_KEY>'), listen on 127.0.0.1 (API_HOST), or set "
        "ALLOW_UNAUTHENTICATED=true if something in front of the worker does the authentication"
    )


def ms(seconds: float) -> int:
    return max(0, int(round(seconds * 1000)))


@dataclass
class Job:
    """A job the service is handling, or handled recently (the output itself lives in the journal)."""

    record: JobRecord
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[Outcome] | None = None
    cancel_requested: bool = False
    progress: collections.deque[Any] = field(default_factory=lambda: collections.deque(maxlen=MAX_STREAM_ITEMS))
    final_streamed: bool = False

    @property
    def id(self) -> str:
        return self.record.id


def job_body(rec: JobRecord) -> dict[str, Any]:
    """The RunPod job body for ``/status``, ``/runsync`` and webhooks.

    Queued and running jobs answer ``{"id", "status"}`` only, as the seeds document it; progress is read from
    ``/stream``.
    """
    body: dict[str, Any] = {"id": rec.id, "status": rec.status}
    if rec.status in (IN_QUEUE, IN_PROGRESS):
        return body
    started = rec.started_at if rec.started_at is not None else rec.finished_at or rec.created_at
    finished = rec.finished_at if rec.finished_at is not None else started
    body["delayTime"] = ms(started - rec.created_at)
    body["executionTime"] = ms(finished - started)
    if rec.status == COMPLETED:
        body["output"] = rec.output
    elif rec.error is not None:
        body["error"] = rec.error
    return body


class JobService:
    """The queue, the runners, the journal and the webhooks behind the API."""

    def __init__(self, settings: Settings, supervisor: Any, engine: Any, journal: Journal,
                 library: WorkflowLibrary) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.engine = engine
        self.journal = journal
        self.library = library
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[str] = collections.deque()
        self.accepting = True
        self.stopping = False
        self.input_hooks: list[InputHook] = []  # e.g. the Deploy facade's upload URLs -> data
        self._wakeup = asyncio.Condition()
        self._runners: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._purger: asyncio.Task[None] | None = None
        self._webhooks: GuardedFetcher | None = None
        self._started_at = time.time()

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        queued, failed = await self.journal.recover()
        for rec in failed:
            log.warning("job %s was running when the worker stopped: FAILED (%s)", rec.id, RESTARTED_MESSAGE)
            if rec.webhook:
                self._spawn(self._send_webhook(rec))
        for rec in queued:
            self.jobs[rec.id] = Job(rec)
            self.queue.append(rec.id)
        if queued:
            log.info("%d job(s) queued before the restart are queued again", len(queued))
        self._runners = [asyncio.create_task(self._runner(n), name=f"job-runner-{n}")
                         for n in range(self.settings.max_concurrency)]
        self._purger = asyncio.create_task(self._purge_loop(), name="job-purge")

    def begin_shutdown(self) -> None:
        """No new jobs; the runners finish the job they hold and take no other."""
        self.accepting = False
        self.stopping = True
        self._spawn(self._notify())

    async def shutdown(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the running jobs; fail the ones still running; keep the queue."""
        self.begin_shutdown()
        running = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        if running:
            log.info("waiting up to %g s for %d running job(s) to finish", grace_s, len(running))
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
        if self._runners:
            await asyncio.wait(self._runners, timeout=grace_s + 15)
        for task in self._runners:
            task.cancel()
        if self._purger is not None:
            self._purger.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=WEBHOOK_TIMEOUT_S)
        for task in list(self._background):
            task.cancel()
        if self._webhooks is not None:
            await self._webhooks.close()
        queued = len(self.queue)
        if queued:
            log.info("%d queued job(s) kept in the journal for the next start", queued)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _notify(self) -> None:
        async with self._wakeup:
            self._wakeup.notify_all()

    # --- submitting and reading jobs -------------------------------------------------------------------

    async def submit(self, job_input: Any, *, kind: str = "run", webhook: str | None = None,
                     meta: dict[str, Any] | None = None, prefix: str = "") -> Job:
        if not self.accepting:
            raise ShuttingDown()
        if len(self.queue) >= self.settings.max_queue:
            raise QueueFull()
        rec = JobRecord(id=f"{prefix}{uuid.uuid4()}", kind=kind, input=job_input, webhook=webhook,
                        meta=dict(meta or {}))
        await self.journal.insert(rec)
        job = Job(rec)
        self.jobs[rec.id] = job
        self.queue.append(rec.id)
        await self._notify()
        return job

    async def record(self, job_id: str) -> tuple[JobRecord | None, Job | None]:
        """The job's current record (output included when finished), and its live entry if it has one."""
        job = self.jobs.get(job_id)
        if job is not None and not job.record.finished:
            return job.record, job
        rec = await self.journal.get(job_id)
        return rec, job

    async def body(self, job_id: str) -> dict[str, Any] | None:
        rec, _job = await self.record(job_id)
        return None if rec is None else job_body(rec)

    async def wait(self, job_id: str, timeout: float) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.record.finished:
            return
        try:
            await asyncio.wait_for(job.done.wait(), timeout)
        except TimeoutError:
            pass

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        if job is not None and not job.record.finished:
            if job.record.status == IN_QUEUE and job_id in self.queue:
                self.queue.remove(job_id)
                await self._finish(job, Outcome(CANCELLED))
                log.info("job %s cancelled while queued", job_id)
            else:
                job.cancel_requested = True
                if job.task is not None and not job.task.done():
                    job.task.cancel()
                    log.info("job %s: cancelling (interrupting ComfyUI)", job_id)
                await job.done.wait()
            return {"id": job_id, "status": job.record.status}
        rec = await self.journal.get(job_id)
        return None if rec is None else {"id": job_id, "status": rec.status}

    async def purge_queue(self) -> int:
        removed = 0
        while self.queue:
            job = self.jobs.get(self.queue.popleft())
            if job is not None and job.record.status == IN_QUEUE:
                await self._finish(job, Outcome(CANCELLED))
                removed += 1
        return removed

    async def stream(self, job_id: str) -> dict[str, Any] | None:
        """RunPod's stream shape: the progress items not yet streamed; the final output once, at the end."""
        rec, job = await self.record(job_id)
        if rec is None:
            return None
        if job is None:  # finished before this process started: track what was streamed from now on
            job = self.jobs[job_id] = Job(JobRecord(id=rec.id, kind=rec.kind, status=rec.status,
                                                    created_at=rec.created_at, started_at=rec.started_at,
                                                    finished_at=rec.finished_at))
            job.done.set()
        items: list[dict[str, Any]] = []
        while job.progress:
            items.append({"output": job.progress.popleft()})
        if rec.status == COMPLETED and not job.final_streamed:
            items.append({"output": rec.output})
            job.final_streamed = True
        body: dict[str, Any] = {"id": rec.id, "status": rec.status, "stream": items}
        if rec.finished and rec.status != COMPLETED and rec.error is not None:
            body["error"] = rec.error
        return body

    async def health(self) -> tuple[int, dict[str, Any]]:
        status = self.supervisor.status()
        counts = await self.journal.counts()
        running = sum(1 for j in self.jobs.values() if j.record.status == IN_PROGRESS)
        serving = status.state.serving and self.accepting
        slots = self.settings.max_concurrency
        body = {
            "jobs": {"completed": counts.get(COMPLETED, 0),
                     "failed": sum(counts.get(s, 0) for s in (FAILED, "TIMED_OUT")),
                     "inProgress": running, "inQueue": len(self.queue), "retried": 0},
            "workers": {"idle": max(0, slots - running) if serving else 0, "running": running,
                        "initializing": slots if status.state in (State.STARTING, State.RESTARTING) else 0,
                        "ready": slots if serving else 0, "throttled": 0,
                        "unhealthy": slots if status.state is State.FAILED else 0},
            "comfyui": status.to_dict(),
        }
        return (200 if serving else 503), body

    # --- running jobs ----------------------------------------------------------------------------------

    async def _runner(self, n: int) -> None:
        while not self.stopping:
            if not await self._wait_serving():
                return
            async with self._wakeup:
                while not self.queue and not self.stopping:
                    await self._wakeup.wait()
                if self.stopping:
                    return
                job = self.jobs.get(self.queue.popleft())
            if job is None or job.record.status != IN_QUEUE:
                continue
            try:
                await self._run(job)
            except Exception:  # noqa: BLE001 - e.g. the journal's disk is full: this runner must go on
                log.exception("runner %d: job %s could not be run or recorded", n, job.id)
                job.record.status, job.record.error = FAILED, "internal error of the worker (see its log)"
                job.record.finished_at = time.time()
                job.done.set()

    async def _wait_serving(self) -> bool:
        """Jobs stay IN_QUEUE while ComfyUI starts or restarts; False when the worker is ending."""
        while not self.stopping:
            try:
                await self.supervisor.wait_ready(5.0)
                return True
            except TimeoutError:
                continue
            except RuntimeError:  # failed or stopping: main() ends the worker
                return False
        return False

    async def _run(self, job: Job) -> None:
        rec = job.record
        if job.cancel_requested:  # cancelled between leaving the queue and starting
            await self._finish(job, Outcome(CANCELLED))
            return
        rec.status, rec.started_at = IN_PROGRESS, time.time()
        job.task = asyncio.create_task(self._execute(job), name=f"job-{rec.id}")
        await self.journal.started(rec.id, rec.started_at)
        log.info("job %s started (waited %.2f s in the queue)", rec.id, rec.started_at - rec.created_at)
        await asyncio.wait({job.task})
        if job.task.cancelled():
            if job.cancel_requested:
                outcome = Outcome(CANCELLED)
            else:
                outcome = Outcome(FAILED, error=SHUTDOWN_MESSAGE.format(grace=self.settings.shutdown_grace_s))
        elif job.task.exception() is not None:
            exc = job.task.exception()
            outcome = Outcome(FAILED, error=f"Internal error of the worker: {type(exc).__name__}: {exc}")
        else:
            outcome = job.task.result()
        await self._finish(job, outcome)

    async def _execute(self, job: Job) -> Outcome:
        rec = job.record
        fmt = requested_format(rec.input, self.settings.response_format)
        try:
            job_input = rec.input
            for hook in self.input_hooks:
                job_input = await hook(job_input, job)
            request = prepare_input(job_input, self.library)
            result = await self.engine.run_job(rec.id, request, lambda event: self._progress(job, event))
            outcome = success(result, result.response_format or fmt)
        except JobError as err:
            outcome = failure(err, fmt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must still end the job with a message
            log.exception("job %s failed unexpectedly", rec.id)
            outcome = failure(InternalError(f"Internal error of the worker: {type(exc).__name__}: {exc}"), fmt)
        try:
            json.dumps(outcome.output)
        except (TypeError, ValueError) as exc:
            outcome = Outcome(FAILED, error=f"Internal error of the worker: the result is not JSON ({exc})")
        return outcome

    def _progress(self, job: Job, event: Any) -> None:
        job.progress.append(event)

    async def _finish(self, job: Job, outcome: Outcome) -> None:
        rec = job.record
        rec.status = outcome.status
        rec.finished_at = time.time()
        rec.output = outcome.output if outcome.status == COMPLETED else None
        rec.error = outcome.error
        rec.input = None
        await self.journal.finished(rec)
        took = rec.finished_at - (rec.started_at or rec.finished_at)
        if outcome.status == COMPLETED:
            log.info("job %s %s in %.2f s", rec.id, outcome.status, took)
        else:
            first = (outcome.error or "").splitlines()[0] if outcome.error else ""
            log.info("job %s %s after %.2f s%s", rec.id, outcome.status, took, f": {first}" if first else "")
        if rec.webhook:
            self._spawn(self._send_webhook(rec))
        rec.output = None  # kept in the journal, not in memory
        job.done.set()

    # --- webhooks and retention ------------------------------------------------------------------------

    async def _send_webhook(self, rec: JobRecord) -> None:
        if self._webhooks is None:
            self._webhooks = GuardedFetcher(self.settings.url_input_allowlist, timeout_s=WEBHOOK_TIMEOUT_S,
                                            user_agent="comfyui-worker-webhook")
        full = await self.journal.get(rec.id) or rec
        body = job_body(full)
        url = rec.webhook or ""
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                await self._webhooks.fetch(url, method="POST", json=body, max_bytes=64 * 1024)
                log.info("job %s: webhook delivered to %s", rec.id, redact_url(url))
                return
            except URLRefused as exc:
                log.warning("job %s: webhook not sent: %s", rec.id, exc)
                return
            except FetchError as exc:
                log.warning("job %s: webhook attempt %d/%d failed: %s", rec.id, attempt, WEBHOOK_ATTEMPTS, exc)
            if attempt < WEBHOOK_ATTEMPTS:
                await asyncio.sleep(WEBHOOK_DELAY_S * attempt)

    async def _purge_loop(self) -> None:
        interval = min(PURGE_INTERVAL_S, max(self.settings.job_retention_s / 2, 0.5))
        while True:
            await asyncio.sleep(interval)
            await self.purge()

    async def purge(self) -> None:
        cutoff = time.time() - self.settings.job_retention_s
        ids, paths = await self.journal.purge(cutoff)
        for job_id in ids:
            self.jobs.pop(job_id, None)
        for job_id in [j.id for j in self.jobs.values() if j.record.finished and (j.record.finished_at or 0) < cutoff]:
            self.jobs.pop(job_id, None)
        if paths:
            await asyncio.to_thread(_remove_paths, paths)


def _remove_paths(paths: list[str]) -> None:
    import shutil
    from pathlib import Path

    for path in paths:
        shutil.rmtree(Path(path).parent, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# HTTP layer
# ---------------------------------------------------------------------------------------------------------

SERVICE: web.AppKey[JobService] = web.AppKey("service", JobService)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)


def public(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a route as served without the bearer token (health, capability URLs)."""
    handler.public = True  # type: ignore[attr-defined]
    return handler


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _token_of(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "").strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    return header  # RunPod also accepts the bare key


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_request_bytes
        return error_response(413, f"request body too large: the limit is {limit} bytes (MAX_REQUEST_BYTES)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = {404: "not found", 405: "method not allowed"}.get(exc.status, exc.reason)
        return error_response(exc.status, f"{reason}: {request.method} {request.path}")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error of the worker (see its log)")


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    route_handler = request.match_info.handler
    if settings.api_key and not getattr(route_handler, "public", False):
        token = _token_of(request)
        if token is None or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            return error_response(401, "Unauthorized: send the header 'Authorization: Bearer <API_KEY>'")
    endpoint = request.match_info.get("endpoint_id")
    if endpoint is not None and settings.endpoint_id and endpoint != settings.endpoint_id:
        return error_response(404, f"no endpoint {endpoint!r} here")
    length = request.content_length
    if length is not None and length > settings.max_request_bytes and not getattr(route_handler, "own_limit", False):
        return error_response(
            413, f"request body too large: {length} bytes, the limit is {settings.max_request_bytes} (MAX_REQUEST_BYTES)")
    return await handler(request)


async def _job_request(request: web.Request) -> tuple[Any, str | None] | web.Response:
    """``{"input": ..., "webhook"?: ...}`` from the body, or the 400 that says what is wrong."""
    try:
        body = await request.json(loads=json.loads)
    except web.HTTPException:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        return error_response(400, f"the request body is not JSON ({exc}); send {{\"input\": {{...}}}}")
    if not isinstance(body, dict) or "input" not in body:
        return error_response(400, "the request body must be a JSON object with an 'input', e.g. "
                                   "{\"input\": {\"workflow\": {...}}}")
    webhook = body.get("webhook")
    if webhook is not None:
        if not isinstance(webhook, str) or not webhook.lower().startswith(("http://", "https://")):
            return error_response(400, "'webhook' must be an http(s) URL")
    return body["input"], webhook


async def _submit(request: web.Request, prefix: str = "") -> Job | web.Response:
    parsed = await _job_request(request)
    if isinstance(parsed, web.Response):
        return parsed
    job_input, webhook = parsed
    service = request.app[SERVICE]
    try:
        return await service.submit(job_input, webhook=webhook, prefix=prefix)
    except QueueFull:
        return error_response(429, f"the queue is full ({service.settings.max_queue} jobs waiting, MAX_QUEUE); "
                                   "retry later")
    except ShuttingDown:
        return error_response(503, "the worker is shutting down and takes no new jobs; retry on another worker")


async def handle_run(request: web.Request) -> web.Response:
    job = await _submit(request)
    if isinstance(job, web.Response):
        return job
    return web.json_response({"id": job.id, "status": job.record.status})


async def handle_runsync(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    wait_s = service.settings.runsync_wait_s
    if "wait" in request.query:
        try:
            wait_s = min(max(int(request.query["wait"]) / 1000, 0.0), MAX_RUNSYNC_WAIT_S)
        except ValueError:
            return error_response(400, "'wait' must be a number of milliseconds")
    job = await _submit(request, prefix="sync-")
    if isinstance(job, web.Response):
        return job
    await service.wait(job.id, wait_s)
    body = await service.body(job.id)
    return web.json_response(body)


async def handle_status(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    body = await request.app[SERVICE].body(job_id)
    if body is None:
        return _not_found(request, job_id)
    return web.json_response(body)


async def handle_cancel(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    body = await request.app[SERVICE].cancel(job_id)
    if body is None:
        return _not_found(request, job_id)
    return web.json_response(body)


async def handle_stream(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    body = await request.app[SERVICE].stream(job_id)
    if body is None:
        return _not_found(request, job_id)
    return web.json_response(body)


async def handle_purge(request: web.Request) -> web.Response:
    removed = await request.app[SERVICE].purge_queue()
    return web.json_response({"removed": removed, "status": "completed"})


@public
async def handle_health(request: web.Request) -> web.Response:
    status, body = await request.app[SERVICE].health()
    return web.json_response(body, status=status)


async def handle_workflows(request: web.Request) -> web.Response:
    library = request.app[SERVICE].library
    return web.json_response({"workflows": [library.workflows[n].summary() for n in library.names()],
                              "unusable": library.broken})


def _not_found(request: web.Request, job_id: str) -> web.Response:
    retention = request.app[SETTINGS].job_retention_s
    return error_response(404, f"job {job_id!r} not found (finished jobs are kept {retention:g} s, "
                               "JOB_RETENTION_S)")


def build_app(service: JobService, settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.max_request_bytes,
                          middlewares=[errors_middleware, auth_middleware])
    app[SERVICE] = service
    app[SETTINGS] = settings
    for prefix in ("", "/v2/{endpoint_id}"):
        app.router.add_post(f"{prefix}/run", handle_run)
        app.router.add_post(f"{prefix}/runsync", handle_runsync)
        app.router.add_route("GET", f"{prefix}/status/{{job_id}}", handle_status)
        app.router.add_route("POST", f"{prefix}/status/{{job_id}}", handle_status)
        app.router.add_post(f"{prefix}/cancel/{{job_id}}", handle_cancel)
        app.router.add_route("GET", f"{prefix}/stream/{{job_id}}", handle_stream)
        app.router.add_route("POST", f"{prefix}/stream/{{job_id}}", handle_stream)
        app.router.add_post(f"{prefix}/purge-queue", handle_purge)
        app.router.add_get(f"{prefix}/health", handle_health)
        app.router.add_get(f"{prefix}/workflows", handle_workflows)
    from supervisor.api.deploy import add_deploy_routes

    add_deploy_routes(app, service, settings)
    return app


async def serve(settings: Settings, supervisor: Any) -> int:
    """Run the API until SIGTERM/SIGINT (exit 0 after draining) or until the supervisor fails (exit 1)."""
    from supervisor.jobs.engine import JobEngine

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    journal = await Journal.open(settings.data_dir / "jobs.sqlite3")
    library = WorkflowLibrary.load(settings.workflows_dir)
    engine = JobEngine(settings, supervisor)
    service = JobService(settings, supervisor, engine, journal, library)
    app = build_app(service, settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.api_host, settings.api_port)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s (API_HOST, API_PORT)", settings.api_host, settings.api_port,
                  exc.strerror or exc)
        await runner.cleanup()
        await journal.close()
        await asyncio.to_thread(supervisor.stop)
        return EXIT_FAILED
    await service.start()
    shown = f"[{settings.api_host}]" if ":" in settings.api_host else settings.api_host
    log.info("API listening on http://%s:%d (auth: %s; %d named workflow(s); concurrency %d)", shown,
             settings.api_port, "bearer token" if settings.api_key else "none", len(library.workflows),
             settings.max_concurrency)
    finished = asyncio.ensure_future(asyncio.to_thread(supervisor.wait_finished))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({finished, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed = supervisor.status().state is State.FAILED and not stop.is_set()
    if failed:
        log.error("exiting: %s", (supervisor.status().message or "ComfyUI failed").splitlines()[0])
        grace = min(settings.shutdown_grace_s, 5.0)  # long enough for the running jobs to report the failure
    else:
        log.info("stop requested: no new jobs; running jobs get up to %g s (SHUTDOWN_GRACE_S)",
                 settings.shutdown_grace_s)
        supervisor.begin_shutdown()
        grace = settings.shutdown_grace_s
    stopping.cancel()
    await service.shutdown(grace)
    await runner.cleanup()
    await engine.close()
    await journal.close()
    await asyncio.to_thread(supervisor.stop)
    finished.cancel()
    return EXIT_FAILED if failed else EXIT_OK
