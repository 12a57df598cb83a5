"""A loopback stand-in for RunPod's job server, so the UNMODIFIED RunPod SDK worker loop runs end to end.

The SDK's worker loop (``runpod.serverless.start``) long-polls ``job-take`` (``job-take-batch`` when its
concurrency is above 1) for jobs, long-polls ``job-stop`` for jobs to stop, POSTs results and progress to
``job-done`` and stream items to ``job-stream``, and a forked process pings ``ping``. This server answers all of
them on 127.0.0.1 and lets a test enqueue jobs and stop requests and read what the worker posted::

    with RunPodJobServer() as rp:
        env = {**worker_env(tmp_path), **rp.env()}
        job_id = rp.enqueue({"workflow": {...}})
        ... start ``python -m supervisor`` with env ...
        result = rp.wait_result(job_id, timeout=30)     # the job-done body, e.g. {"output": {...}}

URL shapes and behaviour are those of ``/work/shared/reference/runpod-sdk.md`` (standard library only).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ENDPOINT = "test-endpoint"
POD_ID = "test-pod"
API_KEY = "test-runpod-key"


@dataclass
class Post:
    """One POST of the worker: which job, which route (job-done / job-stream), the query and the JSON body."""

    job_id: str
    route: str
    query: dict[str, list[str]]
    body: Any
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)

    @property
    def is_progress(self) -> bool:
        return isinstance(self.body, Mapping) and self.body.get("status") == "IN_PROGRESS"


class RunPodJobServer:
    """job-take, job-take-batch, job-stop, job-done, job-stream and ping on 127.0.0.1, driven by the test."""

    def __init__(self, hold_s: float = 0.5) -> None:
        self.hold_s = hold_s  # how long an empty long-poll is held before 204
        self._lock = threading.Condition()
        self._jobs: list[dict[str, Any]] = []
        self._stops: list[str] = []
        self.posts: list[Post] = []
        self.takes: list[dict[str, Any]] = []  # every job-take(-batch) request: path, query, what it got
        self.pings: list[dict[str, list[str]]] = []
        self.auth_headers: set[str] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> "RunPodJobServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                server._get(self)

            def do_POST(self) -> None:  # noqa: N802
                server._post(self)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a worker that exits mid-poll resets its connection: not news

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="runpod-job-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/{ENDPOINT}"

    def env(self, ping_interval_ms: int = 1000) -> dict[str, str]:
        """The platform's environment for the SDK: webhook URLs here, checks off, a pod id and API key."""
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_PING": f"{self.base}/ping/$RUNPOD_POD_ID?gpu=test",
            "RUNPOD_PING_INTERVAL": str(ping_interval_ms),
            "RUNPOD_AI_API_KEY": API_KEY,
            "RUNPOD_POD_ID": POD_ID,
            "RUNPOD_ENDPOINT_ID": ENDPOINT,
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    # --- what a test does --------------------------------------------------------------------------------

    def enqueue(self, job_input: Any, job_id: str | None = None, **extra: Any) -> str:
        job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._jobs.append({"id": job_id, "input": job_input, **extra})
            self._lock.notify_all()
        return job_id

    def request_stop(self, job_id: str) -> None:
        with self._lock:
            self._stops.append(job_id)
            self._lock.notify_all()

    def pending(self) -> int:
        with self._lock:
            return len(self._jobs)

    def posts_for(self, job_id: str) -> list[Post]:
        with self._lock:
            return [p for p in self.posts if p.job_id == job_id]

    def results(self, job_id: str) -> list[Post]:
        """The final results posted for a job (job-done posts that are not progress updates)."""
        return [p for p in self.posts_for(job_id) if p.route == "job-done" and not p.is_progress]

    def progress(self, job_id: str) -> list[Any]:
        return [p.body["output"] for p in self.posts_for(job_id) if p.route == "job-done" and p.is_progress]

    def wait_result(self, job_id: str, timeout: float = 30.0) -> Any:
        """The body of the job's final job-done POST, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                done = [p for p in self.posts if p.job_id == job_id and p.route == "job-done" and not p.is_progress]
                if done:
                    return done[0].body
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no result posted for {job_id} within {timeout} s; posts: "
                                         f"{[(p.job_id, p.route, str(p.body)[:200]) for p in self.posts]}")
                self._lock.wait(min(left, 0.2))

    def wait_for(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._lock.wait(min(left, 0.1))

    # --- the routes --------------------------------------------------------------------------------------

    def _route(self, path: str) -> tuple[str, list[str]]:
        parts = path.strip("/").split("/")
        # v2 / <endpoint> / <route> / <worker> [/ <job id>]
        if len(parts) < 4 or parts[0] != "v2" or parts[1] != ENDPOINT:
            return "", []
        return parts[2], parts[3:]

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        query = parse_qs(url.query)
        route, _rest = self._route(url.path)
        self.auth_headers.add(h.headers.get("Authorization", ""))
        if route in ("job-take", "job-take-batch"):
            batch = route == "job-take-batch"
            size = int(query.get("batch_size", ["1"])[0]) if batch else 1
            jobs = self._take(size)
            with self._lock:
                self.takes.append({"route": route, "query": query, "jobs": [j["id"] for j in jobs], "at": time.monotonic()})
                self._lock.notify_all()
            if not jobs:
                return self._reply(h, 204)
            return self._reply(h, 200, jobs if batch else jobs[0])
        if route == "job-stop":
            ids = self._wait_stops()
            if not ids:
                return self._reply(h, 204)
            return self._reply(h, 200, {"jobsToStop": ids})
        if route == "ping":
            with self._lock:
                self.pings.append(query)
                self._lock.notify_all()
            return self._reply(h, 200, {})
        return self._reply(h, 404, {"error": f"no route {url.path}"})

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        route, rest = self._route(url.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        if route not in ("job-done", "job-stream") or len(rest) < 2:
            return self._reply(h, 404, {"error": f"no route {url.path}"})
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError:
            body = {"unparsable": raw.decode("utf-8", "replace")}
        post = Post(job_id=rest[1], route=route, query=parse_qs(url.query), body=body,
                    headers={k: v for k, v in h.headers.items()})
        with self._lock:
            self.posts.append(post)
            self._lock.notify_all()
        return self._reply(h, 200, {})

    def _take(self, size: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.hold_s
        with self._lock:
            while not self._jobs:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._lock.wait(left)
            taken, self._jobs = self._jobs[:size], self._jobs[size:]
            return taken

    def _wait_stops(self) -> list[str]:
        deadline = time.monotonic() + self.hold_s
        with self._lock:
            while not self._stops:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._lock.wait(left)
            ids, self._stops = self._stops, []
            return ids

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, body: Any = None) -> None:
        data = b"" if body is None or status == 204 else json.dumps(body).encode()
        h.send_response(status)
        if data:
            h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if data:
            h.wfile.write(data)
