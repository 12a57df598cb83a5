"""The job journal (SQLite): what survives a restart, and in which state."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from supervisor.api.journal import RESTARTED_MESSAGE, JobRecord, Journal, UploadRecord


async def test_a_job_is_written_started_finished_and_read_back(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "jobs.sqlite3")
    rec = JobRecord(id="a", input={"workflow": {"1": {"class_type": "X"}}}, webhook="https://example.com/h",
                    meta={"deployment_id": "d"}, created_at=100.0)
    await journal.insert(rec)
    assert await journal.get("a") == rec
    await journal.started("a", 101.0)
    got = await journal.get("a")
    assert got is not None and got.status == "IN_PROGRESS" and got.started_at == 101.0
    rec.status, rec.started_at, rec.finished_at, rec.output = "COMPLETED", 101.0, 103.5, {"images": ["QUJD"]}
    await journal.finished(rec)
    got = await journal.get("a")
    assert got is not None
    assert (got.status, got.output, got.input, got.finished_at) == ("COMPLETED", {"images": ["QUJD"]}, None, 103.5)
    assert got.meta == {"deployment_id": "d"} and got.updated_at == 103.5
    assert await journal.get("nope") is None
    assert await journal.counts() == {"COMPLETED": 1}
    await journal.close()


async def test_after_a_restart_queued_jobs_come_back_in_order_and_running_ones_failed(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    journal = await Journal.open(path)
    for i, status in enumerate(["IN_QUEUE", "IN_PROGRESS", "IN_QUEUE", "COMPLETED", "IN_QUEUE"]):
        await journal.insert(JobRecord(id=f"j{i}", status=status, input={"n": i}, created_at=10.0 + (i % 2)))
    # no close(): the process dies
    again = await Journal.open(path)
    queued, failed = await again.recover(now=50.0)
    assert [r.id for r in queued] == ["j0", "j2", "j4"] and [r.input for r in queued] == [{"n": 0}, {"n": 2}, {"n": 4}]
    assert [(r.id, r.status, r.error, r.finished_at) for r in failed] == [("j1", "FAILED", RESTARTED_MESSAGE, 50.0)]
    stored = await again.get("j1")
    assert stored is not None and stored.status == "FAILED" and stored.error == "worker restarted while the job ran"
    assert stored.input is None
    assert (await again.recover())[1] == []  # recovery happens once
    await again.close()
    await journal.close()


async def test_purge_removes_old_finished_jobs_and_expired_uploads(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "jobs.sqlite3")
    await journal.insert(JobRecord(id="old", status="FAILED", created_at=1, finished_at=5))
    await journal.insert(JobRecord(id="new", status="COMPLETED", created_at=1, finished_at=50))
    await journal.insert(JobRecord(id="queued", created_at=1))
    await journal.add_upload(UploadRecord("tok-old", "a.png", "image/png", 1, 10, str(tmp_path / "u" / "a.png")))
    await journal.add_upload(UploadRecord("tok-new", "b.png", "image/png", 1, 100, str(tmp_path / "u" / "b.png")))
    ids, paths = await journal.purge(finished_before=20, now=30)
    assert ids == ["old"] and paths == [str(tmp_path / "u" / "a.png")]
    assert await journal.get("old") is None and await journal.get("new") and await journal.get("queued")
    assert await journal.get_upload("tok-old") is None
    await journal.uploaded("tok-new", 42)
    up = await journal.get_upload("tok-new")
    assert up is not None and up.size == 42 and up.filename == "b.png"
    await journal.close()


async def test_calls_run_off_the_event_loop_thread(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "jobs.sqlite3")
    seen: list[str] = []
    original = journal._call

    async def spy(fn, *args):  # type: ignore[no-untyped-def]
        def wrapped(*a):  # type: ignore[no-untyped-def]
            seen.append(threading.current_thread().name)
            return fn(*a)

        return await original(wrapped, *args)

    journal._call = spy  # type: ignore[method-assign]
    await asyncio.gather(*(journal.insert(JobRecord(id=f"x{i}")) for i in range(20)))
    assert len(seen) == 20 and all(name.startswith("journal") for name in seen)
    assert threading.current_thread().name not in seen
    await journal.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 20
