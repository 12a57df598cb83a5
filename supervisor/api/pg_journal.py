"""The fleet's job journal and queue: every job in PostgreSQL (``DATABASE_URL``), shared by every worker.

The same calls as the SQLite :class:`supervisor.api.journal.Journal` (so the routes do not know which one they
talk to), plus the queue's: ``claim`` takes the oldest queued job (``FOR UPDATE SKIP LOCKED``: two workers never
take the same one) and leases it to this worker for ``LEASE_S``; ``renew`` extends the leases of the jobs it runs;
``expire`` fails the jobs whose lease ran out (their worker stopped). Each lease has a generation: the end of a job
is written only while this worker still holds that lease, so a worker that comes back after its lease was taken
cannot write over the outcome another worker recorded (``finished`` drops it and says so in the log).

Lease times are the database server's clock (never the workers'), so skewed clocks do not expire leases early.
After the server restarts, leases get ``LEASE_S`` of grace from its start before they can expire: the workers
need that long to reconnect and renew.

``NOTIFY`` tells the other workers at once: ``fleet_queue`` (a job was queued), ``fleet_done`` (a job ended, payload
its id) and ``fleet_cancel`` (cancel the job with this id wherever it runs).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from supervisor.api.journal import (
    IN_PROGRESS,
    IN_QUEUE,
    RESTARTED_MESSAGE,
    UPLOAD_WRITING,
    JobRecord,
    JournalUnavailable,
    JournalWriteError,
    UploadRecord,
    UploadTooLarge,
)
from supervisor.jobs.storage import BucketStorage

log = logging.getLogger("supervisor.api")

SCHEMA_VERSION = 1
SCHEMA_LOCK = 0x636F6D6679  # pg_advisory_lock key: one worker migrates at a time
LABEL = Path("PostgreSQL (DATABASE_URL)")  # how errors name the journal; the URL itself is a secret
BUCKET_PATH = "bucket"  # uploads.path of an upload kept in the bucket (uploads/<token>/<filename>)
STOPPED_MESSAGE = "worker {worker} stopped while the job ran"
QUEUED_SQL = "SELECT count(*) FROM jobs WHERE status = 'IN_QUEUE'"
CHANNELS = ("fleet_queue", "fleet_done", "fleet_cancel")
# what a lost or restarting server raises, asyncpg's client-side protocol errors included
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, OSError,
             TimeoutError)

MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    seq BIGSERIAL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    input JSONB,
    webhook TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    output JSONB,
    error TEXT,
    meta JSONB NOT NULL DEFAULT '{}',
    worker_id TEXT,
    lease_gen INTEGER NOT NULL DEFAULT 0,
    lease_until TIMESTAMPTZ,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX jobs_queued ON jobs (seq) WHERE status = 'IN_QUEUE';
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE status = 'IN_PROGRESS';
CREATE INDEX jobs_finished ON jobs (finished_at);
CREATE TABLE uploads (
    token TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    size INTEGER,
    path TEXT NOT NULL,
    data BYTEA
);
""",
}

# JSON columns: asyncpg hands JSONB over as text; the codec makes them Python values both ways
_JOB_COLUMNS = ("id, kind, status, input, webhook, created_at, started_at, finished_at, output, error, meta,"
                " worker_id, lease_gen, cancel_requested")


async def _init_connection(con: asyncpg.Connection) -> None:
    await con.set_type_codec("jsonb", encoder=lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")),
                             decoder=json.loads, schema="pg_catalog")


def _upload_key(rec: UploadRecord) -> str:
    return f"uploads/{rec.token}/{rec.filename}"


def _row_to_job(row: asyncpg.Record) -> JobRecord:
    status = row["status"]
    if status == IN_PROGRESS and row["cancel_requested"]:
        status = "CANCELLED"  # /cancel answered CANCELLED at once; the worker running it is letting go
    return JobRecord(id=row["id"], kind=row["kind"], status=status, input=row["input"], webhook=row["webhook"],
                     created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
                     output=row["output"], error=row["error"], meta=row["meta"] or {})


class PgJournal:
    """The journal of a fleet: jobs, leases and uploads in one PostgreSQL database."""

    path = LABEL

    def __init__(self, pool: asyncpg.Pool, worker_id: str, lease_s: float) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.inline_max = 8 * 1024 * 1024  # uploads up to this size are kept in the database (FLEET_INLINE_MAX_BYTES)
        self.storage: BucketStorage | None = None  # ... and bigger ones in the bucket, when there is one
        self.leases: dict[str, int] = {}  # job id -> the lease generation this worker holds

    @classmethod
    async def open(cls, url: str, worker_id: str, lease_s: float, *, max_size: int = 4) -> "PgJournal":
        pool = await asyncpg.create_pool(url, min_size=0, max_size=max_size, init=_init_connection,
                                         command_timeout=30)
        journal = cls(pool, worker_id, lease_s)
        await journal.migrate()
        return journal

    async def migrate(self) -> None:
        """Create or bring the schema up to SCHEMA_VERSION; an advisory lock makes concurrent starts take turns."""
        async with self.pool.acquire() as con:
            await con.execute("SELECT pg_advisory_lock($1)", SCHEMA_LOCK)
            try:
                await con.execute("CREATE TABLE IF NOT EXISTS fleet_schema (version INTEGER NOT NULL)")
                version = await con.fetchval("SELECT max(version) FROM fleet_schema") or 0
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    async with con.transaction():
                        await con.execute(MIGRATIONS[step])
                        await con.execute("INSERT INTO fleet_schema (version) VALUES ($1)", step)
                    log.info("fleet journal: schema version %d applied", step)
            finally:
                await con.execute("SELECT pg_advisory_unlock($1)", SCHEMA_LOCK)

    async def close(self) -> None:
        await self.pool.close()

    async def _write(self, fn: Callable[[asyncpg.Connection], Any]) -> Any:
        """A write: the database's and the network's failures become one JournalWriteError."""
        try:
            async with self.pool.acquire() as con:
                return await fn(con)
        except DB_ERRORS as exc:
            raise JournalWriteError(LABEL, exc) from exc

    async def _read(self, fn: Callable[[asyncpg.Connection], Any]) -> Any:
        """A read: the database's and the network's failures become one JournalUnavailable (503 for clients)."""
        try:
            async with self.pool.acquire() as con:
                return await fn(con)
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"the job journal {LABEL} cannot be read now ({type(exc).__name__}: {exc}); "
                                     "retry later") from exc

    # --- jobs ------------------------------------------------------------------------------------------

    async def insert(self, rec: JobRecord) -> None:
        async def _insert(con: asyncpg.Connection) -> None:
            async with con.transaction():
                await con.execute(
                    "INSERT INTO jobs (id, kind, status, input, webhook, created_at, output, error, meta)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    rec.id, rec.kind, rec.status, rec.input, rec.webhook, rec.created_at, rec.output, rec.error,
                    rec.meta or {})
                await con.execute("SELECT pg_notify('fleet_queue', $1)", rec.id)

        await self._write(_insert)

    async def claim(self) -> JobRecord | None:
        """Take the oldest queued job for this worker (IN_PROGRESS, leased LEASE_S); None when none waits."""
        async def _claim(con: asyncpg.Connection) -> asyncpg.Record | None:
            return await con.fetchrow(
                f"UPDATE jobs SET status = 'IN_PROGRESS', started_at = $2, worker_id = $1,"
                f" lease_gen = lease_gen + 1, lease_until = clock_timestamp() + make_interval(secs => $3)"
                f" WHERE id = (SELECT id FROM jobs WHERE status = 'IN_QUEUE' ORDER BY seq"
                f" FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING {_JOB_COLUMNS}",
                self.worker_id, time.time(), self.lease_s)

        row = await self._write(_claim)
        if row is None:
            return None
        self.leases[row["id"]] = row["lease_gen"]
        return _row_to_job(row)

    async def started(self, job_id: str, at: float) -> None:
        """Recorded by ``claim`` already (a fleet job starts when a worker takes it)."""

    async def renew(self, job_ids: Sequence[str]) -> tuple[set[str], set[str]]:
        """Extend this worker's leases on ``job_ids``: (the ones still held, the ones asked to cancel)."""
        gens = [self.leases.get(j, -1) for j in job_ids]

        async def _renew(con: asyncpg.Connection) -> list[asyncpg.Record]:
            return await con.fetch(
                "UPDATE jobs j SET lease_until = clock_timestamp() + make_interval(secs => $2)"
                " FROM unnest($3::text[], $4::int[]) AS l(id, gen)"
                " WHERE j.id = l.id AND j.lease_gen = l.gen AND j.worker_id = $1 AND j.status = 'IN_PROGRESS'"
                " RETURNING j.id, j.cancel_requested", self.worker_id, self.lease_s, list(job_ids), gens)

        rows = await self._write(_renew)
        return {r["id"] for r in rows}, {r["id"] for r in rows if r["cancel_requested"]}

    async def finished(self, rec: JobRecord) -> None:
        """Record the end, only while the job is still ours (our lease) or still queued (cancelled there).

        A worker whose lease was taken (it was stopped, or cut off, past LEASE_S) finds the job ended by another
        worker: its late result is dropped, and said so.
        """
        gen = self.leases.get(rec.id)

        async def _finish(con: asyncpg.Connection) -> str:
            async with con.transaction():
                result = await con.execute(
                    "UPDATE jobs SET status = $1, input = NULL, started_at = $2, finished_at = $3, output = $4,"
                    " error = $5, meta = $6, lease_until = NULL WHERE id = $7 AND ("
                    " (status = 'IN_PROGRESS' AND worker_id = $8 AND lease_gen = $9) OR"
                    " (status = 'IN_QUEUE' AND $9 IS NULL))",
                    rec.status, rec.started_at, rec.finished_at, rec.output, rec.error, rec.meta or {}, rec.id,
                    self.worker_id, gen)
                if result.endswith(" 1"):
                    await con.execute("SELECT pg_notify('fleet_done', $1)", rec.id)
                return result

        result = await self._write(_finish)
        self.leases.pop(rec.id, None)
        if not result.endswith(" 1"):
            log.warning("job %s: late result (%s) dropped: this worker (%s) lost its lease on the job, and the "
                        "outcome another worker recorded stands", rec.id, rec.status, self.worker_id)

    async def get(self, job_id: str) -> JobRecord | None:
        row = await self._read(lambda con: con.fetchrow(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1", job_id))
        return None if row is None else _row_to_job(row)

    async def recover(self, now: float | None = None) -> tuple[list[JobRecord], list[JobRecord]]:
        """At start-up: jobs this WORKER_ID was running before a restart are FAILED; the queue stays shared."""
        at = time.time() if now is None else now

        async def _recover(con: asyncpg.Connection) -> list[asyncpg.Record]:
            return await con.fetch(
                f"UPDATE jobs SET status = 'FAILED', input = NULL, finished_at = $2, error = $3, lease_until = NULL"
                f" WHERE status = 'IN_PROGRESS' AND worker_id = $1 RETURNING {_JOB_COLUMNS}",
                self.worker_id, at, RESTARTED_MESSAGE)

        return [], [_row_to_job(r) for r in await self._write(_recover)]

    async def expire(self) -> list[JobRecord]:
        """Fail the running jobs whose lease ran out: "worker <id> stopped while the job ran"."""
        async def _expire(con: asyncpg.Connection) -> list[asyncpg.Record]:
            async with con.transaction():
                rows = await con.fetch(
                    f"UPDATE jobs SET status = 'FAILED', input = NULL, finished_at = $1, lease_until = NULL,"
                    f" error = replace($2, '{{worker}}', coalesce(worker_id, '?'))"
                    f" WHERE status = 'IN_PROGRESS' AND lease_until < clock_timestamp()"
                    f" AND pg_postmaster_start_time() + make_interval(secs => $3) < clock_timestamp()"
                    f" RETURNING {_JOB_COLUMNS}", time.time(), STOPPED_MESSAGE, self.lease_s)
                for row in rows:
                    await con.execute("SELECT pg_notify('fleet_done', $1)", row["id"])
                return rows

        return [_row_to_job(r) for r in await self._write(_expire)]

    async def cancel(self, job_id: str, at: float) -> JobRecord | None:
        """Cancel a job wherever it is: a queued one ends CANCELLED here; a running one is asked to stop."""
        async def _cancel(con: asyncpg.Connection) -> asyncpg.Record | None:
            async with con.transaction():
                row = await con.fetchrow(
                    f"UPDATE jobs SET status = 'CANCELLED', input = NULL, finished_at = $2 WHERE id = $1 AND"
                    f" status = 'IN_QUEUE' RETURNING {_JOB_COLUMNS}", job_id, at)
                if row is not None:
                    await con.execute("SELECT pg_notify('fleet_done', $1)", job_id)
                    return row
                row = await con.fetchrow(
                    f"UPDATE jobs SET cancel_requested = TRUE WHERE id = $1 AND status = 'IN_PROGRESS'"
                    f" RETURNING {_JOB_COLUMNS}", job_id)
                if row is not None:
                    await con.execute("SELECT pg_notify('fleet_cancel', $1)", job_id)
                    return row
                return await con.fetchrow(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)

        row = await self._write(_cancel)
        return None if row is None else _row_to_job(row)

    async def purge_queue(self, at: float) -> list[JobRecord]:
        """Every queued job of the fleet ends CANCELLED."""
        async def _purge(con: asyncpg.Connection) -> list[asyncpg.Record]:
            async with con.transaction():
                rows = await con.fetch(
                    f"UPDATE jobs SET status = 'CANCELLED', input = NULL, finished_at = $1 WHERE status = 'IN_QUEUE'"
                    f" RETURNING {_JOB_COLUMNS}", at)
                for row in rows:
                    await con.execute("SELECT pg_notify('fleet_done', $1)", row["id"])
                return rows

        return [_row_to_job(r) for r in await self._write(_purge)]

    async def counts(self) -> dict[str, int]:
        rows = await self._read(lambda con: con.fetch("SELECT status, count(*) FROM jobs GROUP BY status"))
        return {r[0]: r[1] for r in rows}

    async def queued(self) -> int:
        return await self._read(lambda con: con.fetchval(QUEUED_SQL))

    async def purge(self, finished_before: float, now: float | None = None) -> tuple[list[str], list[str]]:
        """Delete jobs finished before ``finished_before`` and expired uploads: (job ids, no file paths)."""
        at = time.time() if now is None else now

        async def _purge(con: asyncpg.Connection) -> list[str]:
            async with con.transaction():
                ids = await con.fetch("DELETE FROM jobs WHERE finished_at < $1 RETURNING id", finished_before)
                await con.execute("DELETE FROM uploads WHERE expires_at < $1", at)
            return [r[0] for r in ids]

        return await self._write(_purge), []

    async def reclaim(self) -> tuple[int, int]:
        """PostgreSQL's autovacuum gives space back: nothing to do here."""
        return 0, 0

    def size_bytes(self) -> int:
        return 0

    # --- uploads (ComfyUI Deploy facade): the bytes live in the database, so every node serves them ------

    async def add_upload(self, rec: UploadRecord) -> None:
        await self._write(lambda con: con.execute(
            "INSERT INTO uploads (token, filename, content_type, created_at, expires_at, size, path)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            rec.token, rec.filename, rec.content_type, rec.created_at, rec.expires_at, rec.size, rec.path))

    async def claim_upload(self, token: str) -> bool:
        result = await self._write(lambda con: con.execute(
            "UPDATE uploads SET size = $1 WHERE token = $2 AND size IS NULL", UPLOAD_WRITING, token))
        return result.endswith(" 1")

    async def release_upload(self, token: str) -> None:
        await self._write(lambda con: con.execute(
            "UPDATE uploads SET size = NULL, data = NULL WHERE token = $1 AND size = $2", token, UPLOAD_WRITING))

    async def uploaded(self, token: str, size: int) -> None:
        await self._write(lambda con: con.execute("UPDATE uploads SET size = $1 WHERE token = $2", size, token))

    async def write_upload(self, rec: UploadRecord, data: bytes) -> None:
        """Keep an upload where every node reads it: in the database up to ``inline_max``, else in the bucket."""
        in_bucket = len(data) > self.inline_max
        if in_bucket:
            if self.storage is None:
                raise UploadTooLarge(
                    f"the file is {len(data)} bytes; a fleet keeps uploads up to {self.inline_max} bytes in PostgreSQL "
                    "(FLEET_INLINE_MAX_BYTES) and bigger ones in a bucket, and none is set (BUCKET_ENDPOINT_URL, ...)")
            await self.storage.put_object(_upload_key(rec), data, rec.content_type)
        await self._write(lambda con: con.execute(
            "UPDATE uploads SET data = $1, size = $2, path = $3 WHERE token = $4",
            None if in_bucket else data, len(data), BUCKET_PATH if in_bucket else rec.path, rec.token))

    async def read_upload(self, rec: UploadRecord) -> bytes:
        if rec.path == BUCKET_PATH and self.storage is not None:
            return await self.storage.get_object(_upload_key(rec))
        return await self._read(lambda con: con.fetchval("SELECT data FROM uploads WHERE token = $1", rec.token)) or b""

    async def get_upload(self, token: str) -> UploadRecord | None:
        row = await self._read(lambda con: con.fetchrow(
            "SELECT token, filename, content_type, created_at, expires_at, path, size FROM uploads WHERE token = $1",
            token))
        if row is None:
            return None
        return UploadRecord(token=row["token"], filename=row["filename"], content_type=row["content_type"],
                            created_at=row["created_at"], expires_at=row["expires_at"], path=row["path"],
                            size=row["size"])
