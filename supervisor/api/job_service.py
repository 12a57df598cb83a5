"""The self-hosted API's job service: the queue, the runners, the journal, retention and webhooks.

It knows nothing of HTTP: the routes (:mod:`supervisor.api.http_routes`, :mod:`supervisor.api.deploy`) call
``submit``, ``body``, ``wait``, ``cancel``, ``stream``, ``purge_queue`` and ``health``. Jobs are journaled
(:mod:`supervisor.api.journal`) so nothing is lost across a restart; up to ``MAX_CONCURRENCY`` run at once, at most
``MAX_QUEUE`` wait, finished ones are kept ``JOB_RETENTION_S``. One queue feeds every ComfyUI instance: a runner
takes the next job once a free serving instance is there (:mod:`supervisor.jobs.dispatch`).

SIGTERM: no new jobs, the queue is kept for the next start, running jobs get ``SHUTDOWN_GRACE_S`` to finish; any
still running then is FAILED saying so.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from supervisor.api.formats import (
    CANCELLED,
    COMPLETED,
    FAILED,
    Outcome,
    failure,
    requested_format,
    success,
)
from supervisor.api.journal import (
    IN_PROGRESS,
    IN_QUEUE,
    RESTARTED_MESSAGE,
    JobRecord,
    JournalWriteError,
    Journal,
)
from supervisor.api.safe_json import sendable
from supervisor.api.webhooks import WEBHOOK_TIMEOUT_S, WebhookSender
from supervisor.api.workflows import WorkflowLibrary, prepare_input
from supervisor.comfy.status import State
from supervisor.config import Settings
from supervisor.errors import InternalError, JobError
from supervisor.jobs.dispatch import Instance, InstanceDispatcher
from supervisor.jobs.engine import JobEngine
from supervisor.metrics import WorkerMetrics

log = logging.getLogger("supervisor.api")

PURGE_INTERVAL_S = 60.0
RECLAIM_LOG_BYTES = 1 << 20  # a reclaim that gives back less is not worth a log line
UNSAVED_RETRY_S = 1.0  # how often the end of a job the journal could not record (a full disk) is written again
MAX_STREAM_ITEMS = 1000
SHUTDOWN_MESSAGE = "the worker shut down before the job finished (SHUTDOWN_GRACE_S={grace:g} s passed)"

InputHook = Callable[[Any, "Job"], Awaitable[Any]]


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class DiskFull(Exception):
    """The journal cannot record a new job (DATA_DIR's disk is full): intake answers 503 with this text."""


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

    def __init__(self, settings: Settings, supervisor: Any, engine: JobEngine | InstanceDispatcher, journal: Journal,
                 library: WorkflowLibrary, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.supervisor = supervisor  # the worker's status as a whole (the pool of instances)
        self.dispatcher = engine if isinstance(engine, InstanceDispatcher) else InstanceDispatcher([engine])
        self.engine = self.dispatcher.instances[0].engine  # for what any instance can answer (/info's version)
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
        self._unsaved: dict[str, Job] = {}  # finished jobs whose end the journal could not record yet
        self._flusher: asyncio.Task[None] | None = None
        self._vacuumer: asyncio.Task[None] | None = None
        self._webhooks = WebhookSender(settings.url_input_allowlist)
        self._started_at = time.time()
        self.metrics = metrics or WorkerMetrics.disabled()
        for door in ("api", "deploy"):
            self.metrics.front_door(door)
        self.metrics.track_jobs(lambda: len(self.queue), self.running)

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
        if self.settings.journal_vacuum_interval_s > 0:
            self._vacuumer = asyncio.create_task(self._vacuum_loop(), name="journal-vacuum")

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
        for task in (self._flusher, self._vacuumer):
            if task is not None:
                task.cancel()
        await self._last_flush()
        if self._background:
            await asyncio.wait(list(self._background), timeout=WEBHOOK_TIMEOUT_S)
        for task in list(self._background):
            task.cancel()
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
        await self._admit()
        rec = await self._accept(job_input, kind, webhook, meta, prefix)
        job = Job(rec)
        self.jobs[rec.id] = job
        self.queue.append(rec.id)
        await self._notify()
        return job

    async def _admit(self) -> None:
        """Refuse a new job while shutting down or with the queue full."""
        if not self.accepting:
            raise ShuttingDown()
        if await self._queue_depth() >= self.settings.max_queue:
            raise QueueFull()

    async def _queue_depth(self) -> int:
        return len(self.queue)

    async def _accept(self, job_input: Any, kind: str, webhook: str | None, meta: dict[str, Any] | None,
                      prefix: str) -> JobRecord:
        """The new job, journaled; DiskFull when the journal cannot take it."""
        rec = JobRecord(id=f"{prefix}{uuid.uuid4()}", kind=kind, input=job_input, webhook=webhook,
                        meta=dict(meta or {}))
        try:
            await self.journal.insert(rec)
        except JournalWriteError as exc:
            log.error("job refused: %s", exc)
            raise DiskFull(f"the worker cannot take jobs now: {exc}; retry later") from None
        return rec

    async def record(self, job_id: str) -> tuple[JobRecord | None, Job | None]:
        """The job's current record (output included when finished), and its live entry if it has one."""
        job = self.jobs.get(job_id)
        if job is not None and job_id in self._unsaved:  # finished, but the journal could not record it yet
            return job.record, job
        if job is not None and not job.record.finished:
            if job.cancel_requested:  # /cancel answered CANCELLED at once; ComfyUI is still letting go
                return replace(job.record, status=CANCELLED), job
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
                # answered at once: taking the prompt back from ComfyUI (up to INTERRUPT_GRACE_S, then a restart
                # of ComfyUI) and the cleanup finish in the background, and the job ends CANCELLED
                if job.task is not None and job.task.done():  # it has just ended: its own outcome stands
                    await job.done.wait()
                    return {"id": job_id, "status": job.record.status}
                job.cancel_requested = True
                if job.task is not None:
                    job.task.cancel()
                    log.info("job %s: cancelling (interrupting ComfyUI)", job_id)
                return {"id": job_id, "status": CANCELLED}
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

    def running(self) -> int:
        return sum(1 for j in self.jobs.values() if j.record.status == IN_PROGRESS)

    def readiness(self) -> tuple[bool, str]:
        """Whether this worker should be sent jobs now, and if not, why (the readiness probe's answer)."""
        status = self.supervisor.status()
        if not status.state.serving:
            first = (status.message or "").splitlines()[0] if status.message else ""
            return False, f"ComfyUI is {status.state.value}" + (f": {first}" if first else "")
        if not self.accepting:
            return False, "the worker is shutting down (draining its running jobs) and takes no new jobs"
        if len(self.queue) >= self.settings.max_queue:
            return False, f"the queue is full ({len(self.queue)} jobs waiting, MAX_QUEUE={self.settings.max_queue})"
        return True, f"ComfyUI is {status.state.value}"

    async def health(self) -> tuple[int, dict[str, Any]]:
        """Liveness: 200 with the counts unless the supervisor has failed (the worker is about to exit)."""
        status = self.supervisor.status()
        counts = await self.journal.counts()
        running = self.running()
        serving = status.state.serving and self.accepting
        slots = self.settings.max_concurrency
        instances = self.dispatcher.describe()
        body = {
            "jobs": {"completed": counts.get(COMPLETED, 0),
                     "failed": sum(counts.get(s, 0) for s in (FAILED, "TIMED_OUT")),
                     "inProgress": running, "inQueue": len(self.queue), "retried": 0},
            "workers": {"idle": max(0, slots - running) if serving else 0, "running": running,
                        "initializing": slots if status.state in (State.STARTING, State.RESTARTING) else 0,
                        "ready": slots if serving else 0, "throttled": 0,
                        "unhealthy": slots if status.state is State.FAILED else 0},
            "comfyui": status.to_dict(),
            "instances": instances,
        }
        return (503 if status.state is State.FAILED else 200), body

    # --- running jobs ----------------------------------------------------------------------------------

    async def _runner(self, n: int) -> None:
        """Take the next job once there is one and a free serving instance to run it on; run it there."""
        while not self.stopping:
            if not await self._until_queued():
                return
            instance = await self._claim_instance()
            if instance is None:
                return
            job = self._next_job()
            if job is None:  # another runner took it meanwhile
                self.dispatcher.release(instance, None)
                continue
            try:
                await self._run_guarded(n, job, instance)
            finally:
                self.dispatcher.release(instance, job.record.status)

    async def _run_guarded(self, n: int, job: Job, instance: Instance) -> None:
        """Run a job; a bug that escapes ``_run`` still ends it FAILED and writes that end (retried until the
        journal takes it), so no job is left IN_PROGRESS and this runner goes on."""
        try:
            await self._run(job, instance)
        except Exception as exc:  # noqa: BLE001 - the runner must go on
            log.exception("runner %d: job %s could not be run or recorded", n, job.id)
            if job.done.is_set():
                return
            rec = job.record
            if not rec.finished:
                rec.status, rec.output = FAILED, None
                rec.error = f"Internal error of the worker: {type(exc).__name__}: {exc}"
                rec.finished_at = time.time()
            self._keep_unsaved(job)
            self._count(rec)
            job.done.set()

    async def _until_queued(self) -> bool:
        """Until a job waits in the queue; False when the worker is ending."""
        async with self._wakeup:
            while not self.queue and not self.stopping:
                await self._wakeup.wait()
        return not self.stopping

    def _next_job(self) -> Job | None:
        while self.queue:
            job = self.jobs.get(self.queue.popleft())
            if job is not None and job.record.status == IN_QUEUE:
                return job
        return None

    async def _claim_instance(self) -> Instance | None:
        """Jobs stay IN_QUEUE while no instance is free and serving (e.g. ComfyUI restarts); None when ending."""
        while not self.stopping:
            try:
                return await self.dispatcher.claim(5.0)
            except TimeoutError:
                continue
            except RuntimeError:  # every instance failed, or stopping: main() ends the worker
                return None
        return None

    async def _run(self, job: Job, instance: Instance) -> None:
        rec = job.record
        if job.cancel_requested:  # cancelled between leaving the queue and starting
            await self._finish(job, Outcome(CANCELLED))
            return
        rec.status, rec.started_at = IN_PROGRESS, time.time()
        self.metrics.phase("queue", rec.started_at - rec.created_at)
        job.task = asyncio.create_task(self._execute(job, instance.engine), name=f"job-{rec.id}")
        try:
            await self.journal.started(rec.id, rec.started_at)
        except JournalWriteError as exc:  # the job runs anyway; its end is recorded when the disk allows
            log.error("job %s: its start is not recorded: %s", rec.id, exc)
        on = f" on ComfyUI instance {instance.label}" if len(self.dispatcher.instances) > 1 else ""
        log.info("job %s started%s (waited %.2f s in the queue)", rec.id, on, rec.started_at - rec.created_at)
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

    async def _execute(self, job: Job, engine: JobEngine) -> Outcome:
        rec = job.record
        fmt = requested_format(rec.input, self.settings.response_format)
        try:
            job_input = rec.input
            for hook in self.input_hooks:
                job_input = await hook(job_input, job)
            request = prepare_input(job_input, self.library)
            result = await engine.run_job(rec.id, request, lambda event: self._progress(job, event))
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
        # text that cannot be encoded (an error quoting a lone surrogate ComfyUI sent, say) is escaped: else the
        # journal could not store the result and no client could read it
        rec.output = sendable(outcome.output) if outcome.status == COMPLETED else None
        rec.error = sendable(outcome.error)
        rec.input = None
        saved = await self._record_end(job)
        self._count(rec)
        took = rec.finished_at - (rec.started_at or rec.finished_at)
        if outcome.status == COMPLETED:
            log.info("job %s %s in %.2f s", rec.id, outcome.status, took)
        else:
            first = (outcome.error or "").splitlines()[0] if outcome.error else ""
            log.info("job %s %s after %.2f s%s", rec.id, outcome.status, took, f": {first}" if first else "")
        if rec.webhook:
            self._spawn(self._send_webhook(rec))
        if saved:
            rec.output = None  # kept in the journal, not in memory
        job.done.set()

    async def _record_end(self, job: Job) -> bool:
        """Write the job's end; when the journal cannot (a full disk), keep it in memory and retry until it can.

        The job has ended either way: /status answers from memory meanwhile, and a job is never left
        IN_PROGRESS because its end could not be written.
        """
        rec = job.record
        try:
            await self.journal.finished(rec)
            return True
        except JournalWriteError as exc:
            log.error("job %s %s, but its end is not recorded yet: %s; it is kept in memory and written as soon as "
                      "the journal can be", rec.id, rec.status, exc)
            self._keep_unsaved(job)
            return False

    def _keep_unsaved(self, job: Job) -> None:
        """Hold a finished job in memory until the journal records its end (``_flush_unsaved`` retries)."""
        self._unsaved[job.id] = job
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_unsaved(), name="journal-retry")

    async def _last_flush(self) -> None:
        """At shutdown, one more try at the ends the journal could not take; say which ones are lost."""
        for job_id, job in list(self._unsaved.items()):
            try:
                await self.journal.finished(job.record)
                del self._unsaved[job_id]
            except JournalWriteError as exc:
                log.error("job %s ended %s, but its end could not be recorded before the worker stopped (%s); the "
                          "next start will read it as '%s'", job_id, job.record.status, exc, RESTARTED_MESSAGE)

    async def _flush_unsaved(self) -> None:
        """Every UNSAVED_RETRY_S, write the ends the journal could not take; stop once all are written."""
        while self._unsaved:
            await asyncio.sleep(UNSAVED_RETRY_S)
            for job_id, job in list(self._unsaved.items()):
                try:
                    await self.journal.finished(job.record)
                except JournalWriteError:
                    break  # still full: try again later
                except Exception:  # noqa: BLE001 - a bug must not end the retries of the other jobs
                    log.exception("job %s: writing its end failed; trying again", job_id)
                    break
                del self._unsaved[job_id]
                job.record.output = None
                log.info("job %s: its end (%s) is now recorded in the journal", job_id, job.record.status)

    def _count(self, rec: JobRecord) -> None:
        door = "deploy" if rec.kind == "deploy" else "api"
        self.metrics.job_finished(door, rec.status, (rec.finished_at or time.time()) - rec.created_at)

    # --- webhooks and retention ------------------------------------------------------------------------

    async def _send_webhook(self, rec: JobRecord) -> None:
        full = rec if rec.id in self._unsaved else (await self.journal.get(rec.id) or rec)
        await self._webhooks.send(rec.id, rec.webhook or "", job_body(full))

    async def _purge_loop(self) -> None:
        interval = min(PURGE_INTERVAL_S, max(self.settings.job_retention_s / 2, 0.5))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.purge()
            except JournalWriteError as exc:  # a full disk: purge again next time
                log.warning("purging finished jobs failed: %s", exc)

    async def _vacuum_loop(self) -> None:
        """Every JOURNAL_VACUUM_INTERVAL_S, give the journal's free space back (it never shrinks by itself)."""
        while True:
            await asyncio.sleep(self.settings.journal_vacuum_interval_s)
            try:
                before, after = await self.journal.reclaim()
            except JournalWriteError as exc:
                log.warning("reclaiming the journal's free space failed: %s", exc)
                continue
            if before - after >= RECLAIM_LOG_BYTES:
                log.info("journal %s: %.1f MB -> %.1f MB", self.journal.path, before / 1e6, after / 1e6)

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
    for path in paths:
        shutil.rmtree(Path(path).parent, ignore_errors=True)
