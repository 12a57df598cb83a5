"""The self-hosted API's job journal: every job in SQLite (``DATA_DIR/jobs.sqlite3``), so none is silently lost.

A job is written when it is accepted (with its input), again when it starts, and once more when it ends
(with its output or error; the input is then dropped). After a restart:

* jobs still ``IN_QUEUE`` are queued again, in the order they arrived;
* jobs that were ``IN_PROGRESS`` are ``FAILED`` with "worker restarted while the job ran" -- their ComfyUI
  prompt died with the old process, and re-running a job with side effects is not the worker's decision.

Finished jobs are kept ``JOB_RETENTION_S`` and then purged. Uploads of the ComfyUI Deploy facade
(``/api/upload-url``) are recorded here too.

SQLite is blocking, so every call runs on one dedicated thread (which also serialises them); the event
loop only awaits. WAL mode: a write that returned survives the worker being killed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
FINAL_STATUSES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
RESTARTED_MESSAGE = "worker restarted while the job ran"
RECLAIM_MIN_FREE = 1 << 20  # VACUUM only when at least this much of the file is free pages

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT,
    webhook TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    output TEXT,
    error TEXT,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at);
CREATE TABLE IF NOT EXISTS uploads (
    token TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    size INTEGER,
    path TEXT NOT NULL
);
"""


@dataclass
class JobRecord:
    """One job as the journal (and the API) knows it. Times are epoch seconds."""

    id: str
    kind: str = "run"  # "run": the RunPod contract; "deploy": the ComfyUI Deploy facade
    status: str = IN_QUEUE
    input: Any = None
    webhook: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    output: Any = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def updated_at(self) -> float:
        return self.finished_at or self.started_at or self.created_at


UPLOAD_WRITING = -1  # ``size`` while one PUT writes the file: an upload URL takes one file


@dataclass
class UploadRecord:
    token: str
    filename: str
    content_type: str
    created_at: float
    expires_at: float
    path: str
    size: int | None = None  # None: not written yet; UPLOAD_WRITING: being written; else the bytes stored

    @property
    def stored(self) -> bool:
        return self.size is not None and self.size >= 0


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _row_to_job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(id=row["id"], kind=row["kind"], status=row["status"], input=_loads(row["input"]),
                     webhook=row["webhook"], created_at=row["created_at"], started_at=row["started_at"],
                     finished_at=row["finished_at"], output=_loads(row["output"]), error=row["error"],
                     meta=_loads(row["meta"]) or {})


class UploadTooLarge(Exception):
    """An upload the journal cannot keep (a fleet: over FLEET_INLINE_MAX_BYTES with no bucket); the text says why."""


class JournalUnavailable(Exception):
    """The journal cannot be read now (a fleet's PostgreSQL is unreachable): the routes answer 503 with this text."""


class JournalWriteError(Exception):
    """A write the journal could not make, mostly because DATA_DIR's disk is full; the caller decides what it means.

    ``str()`` is one line for people: what could not be written, why, and what to do.
    """

    def __init__(self, path: Path, exc: BaseException) -> None:
        self.disk_full = isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower() or (
            isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
        what = "disk full: " if self.disk_full else ""
        hint = "; free space on DATA_DIR" if self.disk_full else ""
        super().__init__(f"{what}the job journal {path} cannot be written ({exc}){hint}")


class Journal:
    """Async facade over one SQLite file; every method runs on the journal's own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> "Journal":
        journal = cls(path)
        await journal._call(journal._open)
        return journal

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """A write: SQLite's and the system's failures (a full disk) become one JournalWriteError."""
        try:
            return await self._call(fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise JournalWriteError(self.path, exc) from exc

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "the journal is closed"
        return self._db

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._call(_close)
        self._executor.shutdown(wait=True)

    # --- jobs ------------------------------------------------------------------------------------------

    async def insert(self, rec: JobRecord) -> None:
        def _insert() -> None:
            self.db.execute(
                "INSERT INTO jobs (id, kind, status, input, webhook, created_at, started_at, finished_at, output,"
                " error, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.id, rec.kind, rec.status, _dumps(rec.input), rec.webhook, rec.created_at, rec.started_at,
                 rec.finished_at, _dumps(rec.output), rec.error, _dumps(rec.meta) or "{}"),
            )

        await self._write(_insert)

    async def started(self, job_id: str, at: float) -> None:
        await self._write(lambda: self.db.execute(
            "UPDATE jobs SET status = ?, started_at = ? WHERE id = ?", (IN_PROGRESS, at, job_id)))

    async def finished(self, rec: JobRecord) -> None:
        """Record the end; the input is dropped (it can be megabytes of base64 and is not needed any more)."""
        await self._write(lambda: self.db.execute(
            "UPDATE jobs SET status = ?, input = NULL, started_at = ?, finished_at = ?, output = ?, error = ?,"
            " meta = ? WHERE id = ?",
            (rec.status, rec.started_at, rec.finished_at, _dumps(rec.output), rec.error, _dumps(rec.meta) or "{}",
             rec.id)))

    async def get(self, job_id: str) -> JobRecord | None:
        def _get() -> JobRecord | None:
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else _row_to_job(row)

        return await self._call(_get)

    async def recover(self, now: float | None = None) -> tuple[list[JobRecord], list[JobRecord]]:
        """At start-up: (jobs to queue again in arrival order, jobs just failed because they were running)."""
        at = time.time() if now is None else now

        def _recover() -> tuple[list[JobRecord], list[JobRecord]]:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                running = [_row_to_job(r) for r in db.execute(
                    "SELECT * FROM jobs WHERE status = ? ORDER BY created_at, rowid", (IN_PROGRESS,))]
                db.execute(
                    "UPDATE jobs SET status = 'FAILED', input = NULL, finished_at = ?, error = ? WHERE status = ?",
                    (at, RESTARTED_MESSAGE, IN_PROGRESS))
                queued = [_row_to_job(r) for r in db.execute(
                    "SELECT * FROM jobs WHERE status = ? ORDER BY created_at, rowid", (IN_QUEUE,))]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            for rec in running:
                rec.status, rec.input, rec.finished_at, rec.error = "FAILED", None, at, RESTARTED_MESSAGE
            return queued, running

        return await self._call(_recover)

    async def counts(self) -> dict[str, int]:
        def _counts() -> dict[str, int]:
            return {row[0]: row[1] for row in self.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")}

        return await self._call(_counts)

    async def purge(self, finished_before: float, now: float | None = None) -> tuple[list[str], list[str]]:
        """Delete jobs finished before ``finished_before`` and expired uploads: (job ids, upload file paths)."""
        at = time.time() if now is None else now

        def _purge() -> tuple[list[str], list[str]]:
            db = self.db
            ids = [r[0] for r in db.execute(
                "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?", (finished_before,))]
            db.execute("DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?", (finished_before,))
            paths = [r[0] for r in db.execute("SELECT path FROM uploads WHERE expires_at < ?", (at,))]
            db.execute("DELETE FROM uploads WHERE expires_at < ?", (at,))
            return ids, paths

        return await self._write(_purge)

    async def reclaim(self) -> tuple[int, int]:
        """Give the space of dropped inputs and purged jobs back to the file system; (bytes before, after).

        SQLite reuses freed pages but never shrinks its file, and the WAL file keeps its largest size: after a
        load run the journal stayed at hundreds of MB. ``VACUUM`` rewrites the database when enough of it is free
        (RECLAIM_MIN_FREE), and a TRUNCATE checkpoint empties the WAL. It runs on the journal's thread, so it
        briefly delays the other journal calls; the job engine does not wait on it.
        """

        def _reclaim() -> tuple[int, int]:
            before = self.size_bytes()
            db = self.db
            free = db.execute("PRAGMA freelist_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
            if free >= RECLAIM_MIN_FREE:
                db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return before, self.size_bytes()

        return await self._write(_reclaim)

    def size_bytes(self) -> int:
        """The journal's size on disk: the database and its WAL."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    # --- uploads (ComfyUI Deploy facade) ---------------------------------------------------------------

    async def add_upload(self, rec: UploadRecord) -> None:
        await self._write(lambda: self.db.execute(
            "INSERT INTO uploads (token, filename, content_type, created_at, expires_at, size, path)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rec.token, rec.filename, rec.content_type, rec.created_at, rec.expires_at, rec.size, rec.path)))

    async def claim_upload(self, token: str) -> bool:
        """Take an upload URL for one write; False when it was written (or is being written) already."""
        def _claim() -> bool:
            cur = self.db.execute("UPDATE uploads SET size = ? WHERE token = ? AND size IS NULL",
                                  (UPLOAD_WRITING, token))
            return cur.rowcount == 1

        return await self._write(_claim)

    async def release_upload(self, token: str) -> None:
        """A claimed write that did not complete: the URL may be used again."""
        await self._write(lambda: self.db.execute("UPDATE uploads SET size = NULL WHERE token = ? AND size = ?",
                                                 (token, UPLOAD_WRITING)))

    async def uploaded(self, token: str, size: int) -> None:
        await self._write(lambda: self.db.execute("UPDATE uploads SET size = ? WHERE token = ?", (size, token)))

    async def write_upload(self, rec: UploadRecord, data: bytes) -> None:
        """Store an upload's bytes (a file under DATA_DIR/uploads) and record its size."""
        await asyncio.to_thread(_write_file, Path(rec.path), data)
        await self.uploaded(rec.token, len(data))

    async def read_upload(self, rec: UploadRecord) -> bytes:
        return await asyncio.to_thread(Path(rec.path).read_bytes)

    async def get_upload(self, token: str) -> UploadRecord | None:
        def _get() -> UploadRecord | None:
            row = self.db.execute("SELECT * FROM uploads WHERE token = ?", (token,)).fetchone()
            if row is None:
                return None
            return UploadRecord(token=row["token"], filename=row["filename"], content_type=row["content_type"],
                                created_at=row["created_at"], expires_at=row["expires_at"], path=row["path"],
                                size=row["size"])

        return await self._call(_get)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
