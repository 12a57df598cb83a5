"""The job service of a fleet (``DATABASE_URL`` set): many workers, one queue in PostgreSQL (docs/fleet.md).

The routes call the same methods as on one node (:class:`supervisor.api.job_service.JobService`); what differs:

* ``submit`` only writes the job to the shared queue; whichever worker has a free serving ComfyUI instance takes
  it (:meth:`PgJournal.claim`), so work is taken, not pushed.
* ``/status``, ``/runsync``, ``/cancel``, ``/purge-queue`` answer from the database, whichever node runs the job;
  waiting (``/runsync``) and waking idle runners use LISTEN/NOTIFY, with a slow poll only as a safety net for a
  notification lost while the connection was down.
* The jobs this worker runs keep their lease alive every LEASE_S/3; every worker also fails the jobs whose lease
  ran out (their worker died). A lost lease cancels the job here: its late result would be dropped anyway.
* ``/ready`` answers 503 while the database cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg

from supervisor.api.formats import CANCELLED, Outcome
from supervisor.api.job_service import Job, JobService
from supervisor.api.journal import RESTARTED_MESSAGE, JobRecord, JournalUnavailable, JournalWriteError
from supervisor.api.pg_journal import CHANNELS, DB_ERRORS, QUEUED_SQL, PgJournal

log = logging.getLogger("supervisor.api")

FALLBACK_POLL_S = 2.0  # how often idle runners and waiters look without a notification (a lost NOTIFY)
HEARTBEAT_S = 1.0  # how often the database is checked (readiness, shared queue depth, the LISTEN connection)


class FleetJobService(JobService):
    """A worker of a fleet: takes jobs from the shared queue, answers for every job of the fleet."""

    journal: PgJournal

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker_id = self.settings.worker_id
        self.db_ok = True
        self.shared_queue = 0
        self._queued = asyncio.Event()  # a job may wait in the shared queue
        self._ended: dict[str, asyncio.Event] = {}  # job id -> set when a NOTIFY says it ended
        self._listener: asyncpg.Connection | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._stream_final: set[str] = set()  # jobs of other nodes whose final output /stream gave already
        self.metrics.track_jobs(lambda: self.shared_queue, self.running)
        self.metrics.fleet_worker(self.worker_id, lambda: self.shared_queue)

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        _, failed = await self.journal.recover()
        for rec in failed:
            log.warning("job %s was running on this worker (%s) before it restarted: FAILED (%s)", rec.id,
                        self.worker_id, RESTARTED_MESSAGE)
            if rec.webhook:
                self._spawn(self._send_webhook(rec))
        await self._connect_listener()
        self._runners = [asyncio.create_task(self._runner(n), name=f"job-runner-{n}")
                         for n in range(self.settings.max_concurrency)]
        self._purger = asyncio.create_task(self._purge_loop(), name="job-purge")
        self._loops = [asyncio.create_task(self._heartbeat_loop(), name="fleet-heartbeat"),
                       asyncio.create_task(self._lease_loop(), name="fleet-leases"),
                       asyncio.create_task(self._expire_loop(), name="fleet-expire")]
        log.info("fleet worker %s: jobs from the shared queue in PostgreSQL (LEASE_S=%g)", self.worker_id,
                 self.settings.lease_s)

    async def shutdown(self, grace_s: float) -> None:
        await super().shutdown(grace_s)
        for task in self._loops:
            task.cancel()
        if self._listener is not None:
            with contextlib.suppress(*DB_ERRORS):
                await self._listener.close()

    async def _notify(self) -> None:
        self._queued.set()
        await super()._notify()

    # --- the database connection: LISTEN, readiness, shared depth --------------------------------------

    async def _connect_listener(self) -> None:
        try:
            con = await asyncpg.connect(self.settings.database_url, timeout=5)
            for channel in CHANNELS:
                await con.add_listener(channel, self._on_notify)
        except DB_ERRORS as exc:
            self._set_db(False, exc)
            return
        self._listener = con
        self._queued.set()  # notifications may have been missed while it was down: look once
        for event in self._ended.values():
            event.set()

    def _on_notify(self, _con: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == "fleet_queue":
            self._queued.set()
        elif channel == "fleet_done":
            event = self._ended.get(payload)
            if event is not None:
                event.set()
        elif channel == "fleet_cancel":
            self._cancel_here(payload)

    def _set_db(self, ok: bool, exc: BaseException | None = None) -> None:
        if ok and not self.db_ok:
            log.info("PostgreSQL is reachable again: taking jobs")
        elif not ok and self.db_ok:
            log.error("PostgreSQL cannot be reached: not ready until it can (%s: %s)", type(exc).__name__, exc)
        self.db_ok = ok

    async def _heartbeat_loop(self) -> None:
        """Every HEARTBEAT_S, on the LISTEN connection (never starved by a busy pool): is PostgreSQL there, and
        how deep is the shared queue."""
        while True:
            try:
                if self._listener is None or self._listener.is_closed():
                    await self._connect_listener()
                if self._listener is not None:
                    self.shared_queue = await self._listener.fetchval(QUEUED_SQL, timeout=HEARTBEAT_S * 5)
                    self._set_db(True)
            except DB_ERRORS as exc:
                self._set_db(False, exc)
            except Exception:  # noqa: BLE001 - readiness hangs on this loop: it must go on
                log.exception("fleet heartbeat failed")
            await asyncio.sleep(HEARTBEAT_S)

    # --- leases --------------------------------------------------------------------------------------

    def _held(self) -> list[Job]:
        """Jobs leased here: running, or ended while their end could not be written yet (still ours to write)."""
        return [j for j in self.jobs.values() if j.id in self.journal.leases]

    async def _lease_loop(self) -> None:
        """Renew the leases of the jobs running here; a job whose lease was taken is let go."""
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            held = self._held()
            if not held:
                continue
            try:
                kept, cancels = await self.journal.renew([j.id for j in held])
            except JournalWriteError as exc:
                log.warning("leases of %d running job(s) not renewed: %s", len(held), exc)
                continue
            for job in held:
                if job.id not in kept and job.id in self.journal.leases:
                    log.warning("job %s: this worker (%s) lost its lease (it was stopped or cut off longer than "
                                "LEASE_S); letting the job go", job.id, self.worker_id)
                    if job.task is not None and not job.task.done():
                        job.task.cancel()
                elif job.id in cancels:
                    self._cancel_here(job.id)

    async def _expire_loop(self) -> None:
        """Fail the jobs of workers that stopped renewing their leases."""
        while True:
            await asyncio.sleep(max(0.5, self.settings.lease_s / 3))
            try:
                failed = await self.journal.expire()
            except JournalWriteError:
                continue  # the heartbeat says why
            for rec in failed:
                log.warning("job %s: FAILED (%s): its lease ran out", rec.id, rec.error)
                if rec.webhook:
                    self._spawn(self._send_webhook(rec))

    def _cancel_here(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.task is not None and not job.task.done() and not job.cancel_requested:
            job.cancel_requested = True
            job.task.cancel()
            log.info("job %s: cancelling (asked through another worker)", job_id)

    # --- running jobs ---------------------------------------------------------------------------------

    async def _runner(self, n: int) -> None:
        """Once a serving instance is free, take the oldest job of the shared queue and run it there."""
        while not self.stopping:
            instance = await self._claim_instance()
            if instance is None:
                return
            rec = await self._take()
            if rec is None:
                self.dispatcher.release(instance, None)
                await self._until_notified()
                continue
            job = self.jobs[rec.id] = Job(rec)
            try:
                await self._run_guarded(n, job, instance)
            finally:
                self.dispatcher.release(instance, job.record.status)

    async def _take(self) -> JobRecord | None:
        if self.stopping or not self.db_ok:
            return None
        self._queued.clear()
        try:
            return await self.journal.claim()
        except JournalWriteError:
            return None

    async def _until_notified(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queued.wait(), FALLBACK_POLL_S)

    # --- submitting and reading jobs -------------------------------------------------------------------

    async def submit(self, job_input: Any, *, kind: str = "run", webhook: str | None = None,
                     meta: dict[str, Any] | None = None, prefix: str = "") -> Job:
        """Only into the shared queue: whichever worker has a free instance takes it."""
        await self._admit()
        rec = await self._accept(job_input, kind, webhook, meta, prefix)
        self.shared_queue += 1
        return Job(rec)

    async def _queue_depth(self) -> int:
        """Counted afresh for each new job (an indexed count): MAX_QUEUE holds for the fleet as a whole."""
        self.shared_queue = await self.journal.queued()
        return self.shared_queue

    async def record(self, job_id: str) -> tuple[JobRecord | None, Job | None]:
        job = self.jobs.get(job_id)
        if job is not None and (job_id in self._unsaved or not job.record.finished):
            return await super().record(job_id)
        return await self.journal.get(job_id), job

    async def wait(self, job_id: str, timeout: float) -> None:
        """Until the job ends, wherever it runs (a NOTIFY from the worker that ends it), or ``timeout``."""
        deadline = time.monotonic() + timeout
        event = self._ended.setdefault(job_id, asyncio.Event())
        try:
            while True:
                event.clear()
                rec, _job = await self.record(job_id)
                left = deadline - time.monotonic()
                if rec is None or rec.finished or left <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, FALLBACK_POLL_S))
        except JournalUnavailable:
            return  # the database is gone: answer with what /status can say
        finally:
            self._ended.pop(job_id, None)

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        if job is not None and not job.record.finished:  # it runs here
            return await super().cancel(job_id)
        rec = await self.journal.cancel(job_id, time.time())
        if rec is None:
            return None
        if rec.status == CANCELLED and rec.webhook and rec.started_at is None:
            self._spawn(self._send_webhook(rec))
        return {"id": job_id, "status": rec.status}

    async def purge_queue(self) -> int:
        removed = await self.journal.purge_queue(time.time())
        for rec in removed:
            self._count(rec)
            if rec.webhook:
                self._spawn(self._send_webhook(rec))
        return len(removed)

    async def stream(self, job_id: str) -> dict[str, Any] | None:
        """The running node streams its progress items; any other node gives the status and the final output."""
        if job_id in self.jobs:
            return await super().stream(job_id)
        rec = await self.journal.get(job_id)
        if rec is None:
            return None
        items: list[dict[str, Any]] = []
        if rec.status == "COMPLETED" and job_id not in self._stream_final:
            items.append({"output": rec.output})
            self._stream_final.add(job_id)
        body: dict[str, Any] = {"id": rec.id, "status": rec.status, "stream": items}
        if rec.finished and rec.status != "COMPLETED" and rec.error is not None:
            body["error"] = rec.error
        return body

    async def _finish(self, job: Job, outcome: Outcome) -> None:
        await super()._finish(job, outcome)
        if job.id not in self._unsaved:  # recorded: every node (this one too) reads it from the database now
            self.jobs.pop(job.id, None)

    # --- probes ----------------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if not self.db_ok:
            return False, "PostgreSQL (DATABASE_URL) cannot be reached"
        ready, reason = super().readiness()
        if ready and self.shared_queue >= self.settings.max_queue:
            return False, (f"the shared queue is full ({self.shared_queue} jobs waiting, "
                           f"MAX_QUEUE={self.settings.max_queue})")
        return ready, reason

    async def health(self) -> tuple[int, dict[str, Any]]:
        try:
            self.shared_queue = await self.journal.queued()
            code, body = await super().health()
        except JournalUnavailable as exc:
            self._set_db(False, exc)
            return 200, {"fleet": self._fleet_body()}
        body["jobs"]["inQueue"] = self.shared_queue
        body["fleet"] = self._fleet_body()
        return code, body

    def _fleet_body(self) -> dict[str, Any]:
        return {"workerId": self.worker_id, "sharedQueue": self.shared_queue,
                "database": "connected" if self.db_ok else "unreachable", "leaseS": self.settings.lease_s}
