"""The job journal (SQLite): what survives a restart, and in which state."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sqlite3
import threading
from pathlib import Path

from PIL import Image

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


async def test_reclaim_gives_the_space_of_dropped_inputs_back(tmp_path: Path) -> None:
    """SQLite never shrinks its file: after a load run the journal stayed at 630 MB. ``reclaim`` does."""
    journal = await Journal.open(tmp_path / "jobs.sqlite3")
    big = {"workflow": {}, "image": "A" * 1_000_000}
    records = [JobRecord(id=f"j{n}", input=big, created_at=100.0 + n) for n in range(20)]
    for rec in records:
        await journal.insert(rec)
    for n, rec in enumerate(records):
        rec.status, rec.finished_at = "COMPLETED", 200.0 + n
        await journal.finished(rec)  # drops the input
    grown = journal.size_bytes()
    assert grown > 15_000_000, grown
    before, after = await journal.reclaim()
    assert before == grown and after < 1_000_000, (before, after)
    assert after == journal.size_bytes()
    assert (await journal.get("j7")).status == "COMPLETED"  # nothing of the jobs is lost
    assert await journal.reclaim() == (after, after)  # nothing to give back: no VACUUM, same size
    await journal.close()


def test_a_worker_reclaims_its_journal_on_a_schedule(tmp_path: Path) -> None:
    """JOURNAL_VACUUM_INTERVAL_S: jobs with megabytes of input, then the journal file shrinks by itself."""
    from tests.helpers.api import api_worker
    from tests.helpers.worker import wait_for

    # Each job holds its 2.6 MB input in the journal until it ends: made first, sent together, and slow (2 s in
    # ImageScale), so that at least three of them are still there when the size is read, however loaded the machine.
    bodies = []
    for n in range(4):
        noise = Image.frombytes("RGB", (800, 800), os.urandom(800 * 800 * 3))
        buf = io.BytesIO()
        noise.save(buf, format="PNG")
        workflow = {"1": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
                    "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                                 "width": 8, "height": 8, "crop": "disabled"}},
                    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": f"v{n}"}}}
        images = [{"name": "noise.png", "image": base64.b64encode(buf.getvalue()).decode()}]
        bodies.append({"input": {"workflow": workflow, "images": images}})
    with api_worker(tmp_path, JOURNAL_VACUUM_INTERVAL_S="1", JOB_RETENTION_S="3600",
                    STANDIN_NODE_FAULT="ImageScale:sleep:2") as w:
        journal = Path(w.env["DATA_DIR"]) / "jobs.sqlite3"
        wal = journal.with_name("jobs.sqlite3-wal")

        def size() -> int:
            return sum(p.stat().st_size for p in (journal, wal) if p.exists())

        ids = [w.api.ok("POST", "/run", body)["id"] for body in bodies]
        peak = size()
        assert peak > 4_000_000, peak
        for job in ids:
            assert w.api.wait_status(job, ("COMPLETED",))["status"] == "COMPLETED"
        wait_for(lambda: size() < 1_000_000, 15, what="the journal to shrink")
        assert w.api.ok("GET", f"/status/{ids[0]}")["status"] == "COMPLETED"
