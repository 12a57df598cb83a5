"""The fetcher's byte path: a response body copied to disk while its SHA-256 is computed, and files hashed or copied
with their hash. Standard library only (scripts/bench_fetch.py measures it)."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import STOP, Interrupted, Oversize

CHUNK = 1 << 20


class HashingWriter:
    """Writes chunks to a file and feeds a hash, optionally on a helper thread.

    Inline (the default) hashes each chunk in the receiving thread while it is still hot in the CPU cache; hashlib
    releases the GIL, so parallel downloads keep receiving meanwhile. ``threaded=True`` hands batches of chunks
    (about 1 MiB, no copying) to a helper thread instead, which only pays off for one very fast download with an
    idle core to spare (FETCH_HASH_MODE=thread). scripts/bench_fetch.py measures both against not hashing:
    on a link paced at 200 MiB/s neither slows the download; unthrottled on loopback, where CPU is the limit,
    inline costs less. ``hasher=None`` writes without hashing (the benchmark's baseline).
    """

    _DONE = object()
    BATCH = 1 << 20

    def __init__(self, f: BinaryIO, hasher: Any | None, threaded: bool) -> None:
        self.f = f
        self.hasher = hasher
        self.error: BaseException | None = None
        self.batch: list[bytes] = []
        self.batched = 0
        self.q: queue.Queue[Any] | None = queue.Queue(maxsize=16) if threaded else None
        self.thread = threading.Thread(target=self._run, daemon=True) if threaded else None
        if self.thread:
            self.thread.start()

    def _consume(self, chunks: list[bytes]) -> None:
        self.f.writelines(chunks)
        if self.hasher is not None:
            for chunk in chunks:
                self.hasher.update(chunk)

    def _run(self) -> None:
        assert self.q is not None
        while (chunks := self.q.get()) is not self._DONE:
            if self.error is None:
                try:
                    self._consume(chunks)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = exc

    def write(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.q is None:
            self._consume([chunk])
            return
        self.batch.append(chunk)
        self.batched += len(chunk)
        if self.batched >= self.BATCH:
            self.q.put(self.batch)
            self.batch, self.batched = [], 0

    def close(self) -> None:
        """Drain what is queued (also after a failure: those bytes are valid and go into the kept part)."""
        if self.q is not None and self.thread is not None:
            if self.batch:
                self.q.put(self.batch)
                self.batch, self.batched = [], 0
            self.q.put(self._DONE)
            self.thread.join()
        if self.error is not None:
            raise self.error


def stream_body(chunks: Iterator[bytes], f: BinaryIO, hasher: Any | None, threaded: bool,
                on_bytes: Callable[[int], None], limit: int | None) -> int:
    """Copy a response body into ``f`` while hashing it; returns the bytes written. Stops past ``limit``."""
    writer = HashingWriter(f, hasher, threaded)
    written = 0
    try:
        for chunk in chunks:
            if STOP.is_set():
                raise Interrupted("interrupted")
            if limit is not None and written + len(chunk) > limit:
                raise Oversize(f"the server sent more than the expected {limit} bytes")
            writer.write(chunk)
            written += len(chunk)
            on_bytes(len(chunk))
    finally:
        writer.close()
    return written


def hash_file(path: Path, hasher: Any | None = None, limit: int | None = None) -> Any:
    """Hash (a prefix of) a file already on disk: used for present files and for a kept part before resuming."""
    hasher = hasher or hashlib.sha256()
    remaining = limit
    with path.open("rb") as f:
        while remaining is None or remaining > 0:
            chunk = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not chunk:
                break
            hasher.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return hasher


def copy_hashing(src: Path, dst: Path) -> str:
    """Copy a file and return the sha256 of what was copied (one read of the source)."""
    hasher = hashlib.sha256()
    with src.open("rb") as fin, dst.open("wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            hasher.update(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return hasher.hexdigest()
