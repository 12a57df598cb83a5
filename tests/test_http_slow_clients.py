"""1100 slow clients against a worker limited to 1024 open files: ``/health`` and jobs are served, the log stays short.

The attack of issue 14: clients that send part of a request's headers and then trickle a byte now and then, more
of them than the worker has file descriptors. Before the fix each held its connection forever, ``/health`` and
``/run`` timed out, and asyncio logged ``socket.accept() out of system resource`` thousands of times a second.

The worker runs as a real process under ``RLIMIT_NOFILE`` 1024 with its default ``MAX_CONNECTIONS`` and
``HEADER_TIMEOUT_S``; the clients are real sockets that reconnect whenever the worker closes them.
"""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.api import ROOT, ApiWorker

pytestmark = pytest.mark.timeout(240)

NOFILE = 1024
CLIENTS = 1100
TRICKLE_S = 1.0
ATTACK_S = 25.0
PARTIAL = b"POST /run HTTP/1.1\r\nHost: worker\r\nX-Slow: "


def limit_open_files() -> None:
    """In the worker's child process, before exec: the open-file limit of a small container."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


class SlowClients:
    """``count`` sockets that send part of a request's headers, then one byte per ``TRICKLE_S``; a socket the worker
    closes is opened again at the next round."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.socks: list[socket.socket | None] = [None] * count
        self.connects = 0
        self.closed_by_worker = 0
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)

    def __enter__(self) -> "SlowClients":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for sock in self.socks:
            if sock is not None:
                sock.close()

    def _open(self, i: int) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            sock.setblocking(False)
            sock.send(PARTIAL)
        except OSError:
            return
        self.socks[i] = sock
        self.connects += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, sock in enumerate(self.socks):
                if self._stop.is_set():
                    return
                if sock is None:
                    self._open(i)
                    continue
                try:
                    sock.send(b"a")
                except OSError:  # the worker closed it (timeout, or room made for a newer connection)
                    sock.close()
                    self.socks[i] = None
                    self.closed_by_worker += 1
            self.rounds += 1
            self._stop.wait(TRICKLE_S)

    @property
    def open(self) -> int:
        return sum(1 for s in self.socks if s is not None)


def test_slow_clients_beyond_the_open_file_limit_cannot_take_the_worker_down(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < CLIENTS + 200:
        if hard != resource.RLIM_INFINITY and hard < CLIENTS + 200:
            pytest.skip(f"this test process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (CLIENTS + 200, hard))
    job = json.loads((ROOT / "examples" / "runsync_no_models.json").read_text())
    worker = ApiWorker(tmp_path, API_KEY="slow-clients-key-0123456789")
    worker.start(preexec_fn=limit_open_files)
    try:
        lines_before = len(worker.log_text().splitlines())
        bytes_before = len(worker.log_text())
        answered: list[float] = []
        with SlowClients(worker.port, CLIENTS) as clients:
            deadline = time.monotonic() + 60
            while (clients.rounds < 1 or clients.connects < CLIENTS) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert clients.rounds >= 1, "the slow clients did not get round once"
            assert clients.connects >= CLIENTS
            ends = time.monotonic() + ATTACK_S
            while time.monotonic() < ends:
                started = time.monotonic()
                status, body = worker.api.get("/health", key=None, timeout=10)
                answered.append(time.monotonic() - started)
                assert status == 200, body
                time.sleep(1.0)
            result = worker.api.ok("POST", "/runsync", job, timeout=30)
            assert result["status"] == "COMPLETED", result
            still_open = clients.open
            closed = clients.closed_by_worker
        log = worker.log_text()
        added = log.splitlines()[lines_before:]
        assert closed >= CLIENTS - 512, "the worker never closed a slow connection"
        assert still_open > 0
        assert max(answered) < 10 and len(answered) >= ATTACK_S / 4, answered
        # bounded: a line per condition per interval, not one per event
        assert len(added) <= 20, "\n".join(added[:40])
        assert len(log) - bytes_before < 8000
        assert "out of system resource" not in log
        assert any("MAX_CONNECTIONS" in line for line in added), "\n".join(added)
        # and after the attack the worker is as it was
        assert worker.api.get("/health", key=None)[0] == 200
    finally:
        assert worker.proc is not None
        worker.proc.cleanup()
