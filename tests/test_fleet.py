"""A fleet: two real workers, each with its own stand-in ComfyUI, on one real PostgreSQL (issue 18's "Done when").

Each test gets a fresh database on one throwaway cluster (tests/helpers/postgres.py); LEASE_S is 3 s so the lease
rules show within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from supervisor.api.pg_journal import SCHEMA_VERSION, PgJournal
from tests.helpers.api import ApiWorker, api_worker
from tests.helpers.postgres import PgCluster, pg_cluster
from tests.helpers.worker import tree_processes, wait_for

LEASE_S = 3.0
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture
def db(pg: PgCluster) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg.new_database(name)
    return name


def quick(prefix: str) -> dict[str, Any]:
    return {"input": {"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}}}


def blurred(prefix: str, color: int = 0) -> dict[str, Any]:
    """A job through ImageBlur: slow on a worker whose stand-in has STANDIN_NODE_FAULT=ImageBlur:sleep:N (once per
    ``color``: ComfyUI caches the outputs of nodes whose inputs did not change)."""
    return {"input": {"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}}}


def fleet_worker(tmp_path: Path, pg: PgCluster, db: str, worker_id: str, **env: Any) -> Any:
    (tmp_path / worker_id).mkdir(exist_ok=True)
    return api_worker(tmp_path / worker_id, DATABASE_URL=pg.url_of(db), WORKER_ID=worker_id, LEASE_S=str(LEASE_S),
                      **env)


def jobs_table(pg: PgCluster, db: str) -> dict[str, tuple[str, str, int, str]]:
    """Job id -> (status, worker id, lease generation, error) as the database has it."""
    rows = pg.psql("SELECT id, status, coalesce(worker_id, ''), lease_gen, coalesce(error, '') FROM jobs", db)
    return {r[0]: (r[1], r[2], int(r[3]), r[4]) for r in rows}


def kill_tree(worker: ApiWorker) -> None:
    """kill -9 of the worker and its ComfyUI, as a node that loses power."""
    for proc in tree_processes(worker.env["TEST_TREE_ID"]):
        with contextlib.suppress(Exception):
            proc.kill()
    assert worker.proc is not None
    worker.proc.proc.wait(10)


def on_a(a: ApiWorker, b: ApiWorker, pg: PgCluster, db: str, job: dict[str, Any]) -> str:
    """Submit a job that A takes: B is stopped (SIGSTOP) until A runs it."""
    assert b.proc is not None
    b.proc.signal(signal.SIGSTOP)
    try:
        job_id = a.api.ok("POST", "/run", job)["id"]
        wait_for(lambda: jobs_table(pg, db)[job_id][:2] in (("IN_PROGRESS", "A"), ("COMPLETED", "A")), 10,
                 what="A to take the job")
    finally:
        b.proc.signal(signal.SIGCONT)
    return job_id


async def test_workers_starting_at_once_create_the_schema_once(pg: PgCluster, db: str) -> None:
    journals = await asyncio.gather(*(PgJournal.open(pg.url_of(db), f"w{i}", LEASE_S) for i in range(6)))
    try:
        assert pg.psql("SELECT version FROM fleet_schema", db) == [[str(SCHEMA_VERSION)]]
        again = await PgJournal.open(pg.url_of(db), "late", LEASE_S)  # an up-to-date schema is left alone
        await again.close()
        assert pg.psql("SELECT count(*) FROM fleet_schema", db) == [["1"]]
    finally:
        await asyncio.gather(*(j.close() for j in journals))


def test_two_workers_share_one_queue_and_answer_for_every_job(tmp_path: Path, pg: PgCluster, db: str) -> None:
    with fleet_worker(tmp_path, pg, db, "A", STANDIN_NODE_FAULT="ImageBlur:sleep:4", MAX_QUEUE="300") as a, \
            fleet_worker(tmp_path, pg, db, "B", MAX_QUEUE="300") as b:
        nodes = (a, b)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: nodes[i % 2].api.ok("POST", "/run", quick(f"j{i}"))["id"], range(200)))
        assert len(set(ids)) == 200
        bodies = {}
        for job_id in ids:
            body = a.api.wait_status(job_id, FINAL, timeout=60)
            assert body["status"] == "COMPLETED", body
            assert b.api.ok("GET", f"/status/{job_id}") == body  # the same answer from either node
            bodies[job_id] = body
        took = time.monotonic() - started
        table = jobs_table(pg, db)
        assert all(table[j][0] == "COMPLETED" and table[j][2] == 1 for j in ids), "a job ran twice or not at all"
        ran_on = {table[j][1] for j in ids}
        assert ran_on == {"A", "B"}, ran_on

        # /runsync to A while A's only ComfyUI is busy (a 4 s blur): B takes the job and A answers with its result
        slow = on_a(a, b, pg, db, blurred("slow"))
        status, body = a.api.post("/runsync", quick("sync"))
        assert status == 200 and body["status"] == "COMPLETED", body
        assert jobs_table(pg, db)[body["id"]][1] == "B"
        assert b.api.ok("GET", f"/status/{body['id']}") == body

        health = b.api.ok("GET", "/health")
        assert health["fleet"] == {"workerId": "B", "sharedQueue": 0, "database": "connected", "leaseS": LEASE_S}
        b.api.post("/run", quick("waits"))  # B's ComfyUI is free: it is taken at once
        assert a.api.ok("GET", "/health")["fleet"]["sharedQueue"] in (0, 1)
        metrics = a.api.request("GET", "/metrics")[1].decode()
        assert 'comfyui_worker_fleet_worker{worker_id="A"} 1.0' in metrics
        assert "comfyui_worker_fleet_queue_depth " in metrics  # the heartbeat's count: up to HEARTBEAT_S old
    print(f"200 jobs through two workers in {took:.1f} s")


def test_a_killed_worker_loses_nothing_and_rejoins(tmp_path: Path, pg: PgCluster, db: str) -> None:
    with fleet_worker(tmp_path, pg, db, "A", STANDIN_NODE_FAULT="ImageBlur:sleep:30") as a:
        running = a.api.ok("POST", "/run", blurred("long"))["id"]
        wait_for(lambda: jobs_table(pg, db)[running][:2] == ("IN_PROGRESS", "A"), 10, what="A to run the job")
        with fleet_worker(tmp_path, pg, db, "B", STANDIN_NODE_FAULT="ImageBlur:sleep:0.2") as b:
            queued = [(a, b)[i % 2].api.ok("POST", "/run", blurred(f"q{i}", color=i))["id"] for i in range(20)]
            kill_tree(a)
            killed_at = time.monotonic()
            body = b.api.wait_status(running, FINAL, timeout=LEASE_S + 10)
            noticed = time.monotonic() - killed_at
            assert body["status"] == "FAILED" and body["error"] == "worker A stopped while the job ran", body
            assert noticed <= LEASE_S + 5, noticed
            for job_id in queued:
                assert b.api.wait_status(job_id, FINAL, timeout=60)["status"] == "COMPLETED"
            table = jobs_table(pg, db)
            assert all(table[j][2] == 1 for j in [running, *queued]), "a job was taken twice"

            # A restarted rejoins: with B stopped (SIGSTOP), the next job can only be A's
            a.start(log_name="worker-again.log")
            again = on_a(a, b, pg, db, quick("again"))
            assert a.api.wait_status(again, FINAL, timeout=20)["status"] == "COMPLETED"
    print(f"the killed worker's job FAILED {noticed:.1f} s after kill -9 (LEASE_S={LEASE_S:g})")


def test_a_stopped_worker_does_not_overwrite_the_recorded_outcome(tmp_path: Path, pg: PgCluster, db: str) -> None:
    with fleet_worker(tmp_path, pg, db, "A", STANDIN_NODE_FAULT="ImageBlur:sleep:2") as a, \
            fleet_worker(tmp_path, pg, db, "B", STANDIN_NODE_FAULT="ImageBlur:sleep:60") as b:
        assert a.proc is not None
        job_id = on_a(a, b, pg, db, blurred("stopped"))
        a.proc.signal(signal.SIGSTOP)  # the worker only: its ComfyUI finishes the prompt meanwhile
        try:
            body = b.api.wait_status(job_id, FINAL, timeout=LEASE_S + 10)
            assert body == {**body, "status": "FAILED", "error": "worker A stopped while the job ran"}
            time.sleep(2)  # past LEASE_S + 5 s in all
        finally:
            a.proc.signal(signal.SIGCONT)
        wait_for(lambda: f"job {job_id}: late result" in a.log_text(), 15, what="A to drop its late result")
        assert a.api.ok("GET", f"/status/{job_id}") == b.api.ok("GET", f"/status/{job_id}") == body
        assert jobs_table(pg, db)[job_id][0] == "FAILED"


def test_postgresql_restarted_mid_run_loses_no_accepted_job(tmp_path: Path, pg: PgCluster, db: str) -> None:
    with fleet_worker(tmp_path, pg, db, "A", STANDIN_NODE_FAULT="ImageBlur:sleep:0.5") as a, \
            fleet_worker(tmp_path, pg, db, "B", STANDIN_NODE_FAULT="ImageBlur:sleep:0.5") as b:
        accepted = [(a, b)[i % 2].api.ok("POST", "/run", blurred(f"r{i}", color=i))["id"] for i in range(16)]
        time.sleep(1.0)
        pg.stop("fast")
        try:
            for node in (a, b):
                wait_for(lambda node=node: node.api.get("/ready")[0] == 503, 10, what="/ready 503 without PostgreSQL")
            status, _ = a.api.post("/run", quick("refused"))
            assert status == 503  # refused, not accepted and lost
            status, body = b.api.get(f"/status/{accepted[0]}")  # ended before: only the database knows it
            assert status == 503 and "cannot be read now" in body["error"] and "fleet-test-secret" not in body["error"]
            time.sleep(2.0)
        finally:
            pg.start()
        for node in (a, b):
            wait_for(lambda node=node: node.api.get("/ready")[0] == 200, 20, what="/ready 200 after the restart")
        for job_id in accepted:
            assert a.api.wait_status(job_id, FINAL, timeout=60)["status"] == "COMPLETED", job_id
        table = jobs_table(pg, db)
        assert all(table[j][0] == "COMPLETED" and table[j][2] == 1 for j in accepted)


def test_cancel_purge_and_stream_reach_jobs_on_the_other_node(tmp_path: Path, pg: PgCluster, db: str) -> None:
    with fleet_worker(tmp_path, pg, db, "A", STANDIN_NODE_FAULT="ImageBlur:sleep:5", MAX_QUEUE="3") as a, \
            fleet_worker(tmp_path, pg, db, "B", STANDIN_NODE_FAULT="ImageBlur:sleep:5", MAX_QUEUE="3") as b:
        long_jobs = [a.api.ok("POST", "/run", blurred(f"long{i}", color=i))["id"] for i in range(2)]
        wait_for(lambda: {jobs_table(pg, db)[j][:2] for j in long_jobs} == {("IN_PROGRESS", "A"), ("IN_PROGRESS", "B")},
                 10, what="one long job on each worker")
        queued = [b.api.ok("POST", "/run", quick(f"wait{i}"))["id"] for i in range(3)]
        status, body = a.api.post("/run", quick("one-too-many"))  # MAX_QUEUE counts the fleet's shared queue
        assert status == 429, body
        wait_for(lambda: a.api.get("/ready")[0] == 503, 5, what="/ready 503 with the shared queue full")
        assert "shared queue is full" in a.api.get("/ready")[1]["reason"]
        assert a.api.ok("POST", "/purge-queue") == {"removed": 3, "status": "completed"}
        for job_id in queued:
            assert b.api.ok("GET", f"/status/{job_id}")["status"] == "CANCELLED"

        on = {jobs_table(pg, db)[j][1]: j for j in long_jobs}
        assert b.api.ok("GET", f"/stream/{on['A']}") == {"id": on["A"], "status": "IN_PROGRESS", "stream": []}
        assert b.api.ok("POST", f"/cancel/{on['A']}") == {"id": on["A"], "status": "CANCELLED"}
        assert a.api.ok("POST", f"/cancel/{on['B']}") == {"id": on["B"], "status": "CANCELLED"}
        for job_id in long_jobs:
            for node in (a, b):
                assert node.api.ok("GET", f"/status/{job_id}")["status"] == "CANCELLED"
        wait_for(lambda: all(jobs_table(pg, db)[j][0] == "CANCELLED" for j in long_jobs), 20,
                 what="both workers to let their cancelled job go")
        assert "cancelling (asked through another worker)" in a.log_text()
        assert "cancelling (asked through another worker)" in b.log_text()

        done = a.api.ok("POST", "/runsync", quick("streamed"))
        first = b.api.ok("GET", f"/stream/{done['id']}")
        assert first == {"id": done["id"], "status": "COMPLETED", "stream": [{"output": done["output"]}]}
        assert b.api.ok("GET", f"/stream/{done['id']}")["stream"] == []  # the final output is streamed once
        for node in (a, b):
            assert "fleet-test-secret" not in node.log_text()  # DATABASE_URL's password is never logged
            assert node.proc is not None
            comfyui = [p for p in tree_processes(node.env["TEST_TREE_ID"]) if p.pid != node.proc.proc.pid]
            assert comfyui and all("DATABASE_URL" not in p.environ() for p in comfyui)  # nor given to ComfyUI


def test_deploy_uploads_are_served_by_every_node(tmp_path: Path, pg: PgCluster, db: str) -> None:
    from tests.helpers.jobs import make_bucket, moto_s3_server, png_bytes

    small, big = png_bytes((10, 200, 10), (8, 8)), png_bytes((200, 10, 10), (256, 256))
    assert len(small) < 500 < len(big)

    def upload(node: ApiWorker, name: str, data: bytes) -> tuple[int, Any, str]:
        url = node.api.ok("POST", "/api/upload-url", {"filename": name, "content_type": "image/png"})
        status, body = node.api.request("PUT", url["upload_url"], raw=data, key=None)
        return status, body, url["file_url"]

    def served(node: ApiWorker, file_url: str) -> bytes:
        return node.api.request("GET", node.api.base + file_url[file_url.index("/api/uploads/"):])[1]

    with fleet_worker(tmp_path, pg, db, "A", FLEET_INLINE_MAX_BYTES="500") as a:
        status, body, _ = upload(a, "big.png", big)
        assert status == 413 and "FLEET_INLINE_MAX_BYTES" in body["error"], body
    with moto_s3_server() as endpoint:
        make_bucket(endpoint, "uploads")
        bucket = {"BUCKET_ENDPOINT_URL": f"{endpoint}/uploads", "BUCKET_ACCESS_KEY_ID": "test-key-id",
                  "BUCKET_SECRET_ACCESS_KEY": "test-secret-key", "FLEET_INLINE_MAX_BYTES": "500"}
        with fleet_worker(tmp_path, pg, db, "A", **bucket) as a, fleet_worker(tmp_path, pg, db, "B", **bucket) as b:
            status, _, small_url = upload(a, "small.png", small)
            assert status == 200
            status, _, big_url = upload(b, "big.png", big)
            assert status == 200
            for node in (a, b):
                assert served(node, small_url) == small
                assert served(node, big_url) == big
    # the small one in PostgreSQL, the big one in the bucket only
    assert pg.psql("SELECT filename, path = 'bucket', data IS NULL FROM uploads WHERE size > 0 ORDER BY size", db) == [
        ["small.png", "f", "f"], ["big.png", "t", "t"]]
