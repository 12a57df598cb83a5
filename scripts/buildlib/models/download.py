"""One entry made whole and verified: a present file is hashed, a cached one copied, anything else downloaded into
a ``.part`` that a cut connection resumes with ``Range``; only a file whose SHA-256 is right is renamed into place.
The optional cache is content-addressed and may be shared between builds (one writer per hash, with flock)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2

from .config import PROG, FetchConfig
from .errors import TRANSIENT_STATUS, FetchError, Oversize, Transient
from .hub import Remote, Sources
from .plan import Target
from .progress import Progress
from .streaming import copy_hashing, hash_file, stream_body


class Cache:
    """A content-addressed store (``sha256/<hex>``) that may be a mounted build cache shared between builds."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("sha256", "partial", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def blob(self, sha: str) -> Path:
        return self.root / "sha256" / sha

    def part(self, sha: str) -> Path:
        return self.root / "partial" / f"{sha}.part"

    def lock_file(self, sha: str) -> Path:
        return self.root / "locks" / f"{sha}.lock"


class Fetcher:
    """Fetches targets: present file, else cache, else download into a .part, verify, rename."""

    def __init__(self, cfg: FetchConfig, progress: Progress) -> None:
        self.cfg = cfg
        self.progress = progress
        self.log = progress.log
        self.sources = Sources(cfg, self.log)
        self.cache = Cache(cfg.cache_dir) if cfg.cache_dir else None
        self.client = httpx2.Client(follow_redirects=True, timeout=httpx2.Timeout(cfg.timeout_s, connect=30.0))
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def close(self) -> None:
        self.client.close()

    # ---------------------------------------------------------------- one entry

    def fetch(self, t: Target) -> tuple[str, str]:
        """Make ``t.dest`` hold the verified file; returns how (present, cache or downloaded) and its sha256."""
        entry = t.entry
        expected, origin = entry.sha256, "the manifest"
        remote: Remote | None = None
        if expected is None:  # an hf entry without a pinned hash: the hub's LFS sha256 is the one enforced
            remote = self._resolve_with_retries(t)
            if not remote.sha256:
                raise FetchError(f"{entry.label}: the hub publishes no sha256 for {entry.source.describe()} (not an "
                                 "LFS file); add 'sha256' to the entry")
            expected, origin = remote.sha256, remote.sha256_origin
        if self._present(t, expected):
            return "present", expected
        with self._exclusive(expected):
            if self.cache and self._from_cache(t, expected):
                return "cache", expected
            remote = remote or self._resolve_with_retries(t)
            self._check_remote(t, remote, expected)
            part = self.cache.part(expected) if self.cache else self._local_part(t.dest, expected)
            actual, size = self._download(t, remote, part)
            if actual != expected:
                part.unlink(missing_ok=True)
                raise FetchError(f"{entry.label}: sha256 mismatch for {entry.destination}: expected {expected} "
                                 f"(from {origin}), got {actual}; the downloaded file was deleted")
            if entry.size is not None and size != entry.size:
                part.unlink(missing_ok=True)
                raise FetchError(f"{entry.label}: size mismatch for {entry.destination}: the manifest says "
                                 f"{entry.size} bytes, got {size}; the downloaded file was deleted")
            self._place(part, t.dest, expected)
        return "downloaded", expected

    def _present(self, t: Target, expected: str) -> bool:
        """True when the destination already holds the right bytes (idempotent re-runs hash, never download)."""
        dest = t.dest
        if not dest.is_file():
            return False
        if t.entry.size is not None and dest.stat().st_size != t.entry.size:
            self.log(f"{PROG}: {t.entry.label}: {dest} has {dest.stat().st_size} bytes, not {t.entry.size}; "
                     "replacing it")
            return False
        actual = hash_file(dest).hexdigest()
        if actual == expected:
            return True
        self.log(f"{PROG}: {t.entry.label}: {dest} has sha256 {actual}, not {expected}; replacing it")
        return False

    def _from_cache(self, t: Target, expected: str) -> bool:
        assert self.cache is not None
        blob = self.cache.blob(expected)
        if not blob.is_file():
            return False
        tmp = self._local_part(t.dest, expected, suffix=".copy")
        actual = copy_hashing(blob, tmp)
        if actual != expected:  # a damaged cache entry is dropped and the file downloaded again
            self.log(f"{PROG}: {t.entry.label}: cache entry {blob} has sha256 {actual}; discarding it")
            tmp.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            return False
        os.replace(tmp, t.dest)
        return True

    def _check_remote(self, t: Target, remote: Remote, expected: str) -> None:
        """Fail before downloading gigabytes when the source already says it holds other bytes."""
        if t.entry.size is not None and remote.size is not None and remote.size != t.entry.size:
            raise FetchError(f"{t.entry.label}: the manifest says {t.entry.size} bytes but "
                             f"{t.entry.source.describe()} has {remote.size}; fix 'size' (or remove it)")
        if remote.sha256 and remote.sha256 != expected:
            where = f" at commit {remote.commit}" if remote.commit else ""
            raise FetchError(f"{t.entry.label}: the hub's file {t.entry.source.describe()}{where} has sha256 "
                             f"{remote.sha256}, but the manifest pins {expected}; pin the revision that has it, or "
                             "remove 'sha256' and run `fetch_models.py lock`")

    def _local_part(self, dest: Path, sha: str, suffix: str = ".part") -> Path:
        """A hidden part file beside the destination, named by the hash it must reach (so a changed pin never
        resumes someone else's bytes); stale parts for other hashes are removed."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f".{dest.name}.*{suffix}"):
            if stale.name != f".{dest.name}.{sha[:16]}{suffix}":
                stale.unlink(missing_ok=True)
        return dest.parent / f".{dest.name}.{sha[:16]}{suffix}"

    def _place(self, part: Path, dest: Path, sha: str) -> None:
        """Atomic placement: only a verified file is ever renamed to its final name."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.cache is None:
            os.replace(part, dest)
            return
        blob = self.cache.blob(sha)
        os.replace(part, blob)
        tmp = self._local_part(dest, sha, suffix=".copy")
        try:
            tmp.unlink(missing_ok=True)
            os.link(blob, tmp)
        except OSError:  # another filesystem (a mounted cache): copy
            shutil.copyfile(blob, tmp)
        os.replace(tmp, dest)

    @contextmanager
    def _exclusive(self, sha: str) -> Iterator[None]:
        """One writer per hash: threads of this run, and other runs sharing the cache (flock)."""
        with self._locks_guard:
            lock = self._locks.setdefault(sha, threading.Lock())
        with lock:
            if self.cache is None:
                yield
                return
            with self.cache.lock_file(sha).open("a") as lf:
                fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lf.fileno(), fcntl.LOCK_UN)

    # ---------------------------------------------------------------- download with resume

    def _resolve_with_retries(self, t: Target) -> Remote:
        return self._retrying(t, lambda: self.sources.resolve(t), None)

    def _retrying(self, t: Target, action: Callable[[], Any], part: Path | None) -> Any:
        for attempt in range(self.cfg.retries + 1):
            try:
                return action()
            except Transient as exc:
                kept = part.stat().st_size if part is not None and part.exists() else 0
                if attempt == self.cfg.retries:
                    keep = f"; {kept} bytes kept in {part} for the next run" if kept else ""
                    raise FetchError(f"{t.entry.label}: failed after {attempt + 1} attempt(s): {exc}{keep}") from None
                wait = min(self.cfg.retry_wait_s * 2 ** attempt, 60.0)
                self.log(f"{PROG}: {t.entry.label}: {exc}; retrying in {wait:.1f}s "
                         f"(attempt {attempt + 2} of {self.cfg.retries + 1}{f', resuming at byte {kept}' if kept else ''})")
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _download(self, t: Target, first: Remote, part: Path) -> tuple[str, int]:
        remotes = iter([first])

        def attempt() -> tuple[str, int]:
            remote = next(remotes, None) or self.sources.resolve(t)
            return self._stream_once(t, remote, part)

        return self._retrying(t, attempt, part)

    def _stream_once(self, t: Target, remote: Remote, part: Path) -> tuple[str, int]:
        """One GET, resuming from the kept part; returns (sha256, size) of the complete part or raises."""
        size = t.entry.size or remote.size
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        hasher = hashlib.sha256()
        if have:
            hash_file(part, hasher, have)
            if size is not None and have == size:
                return hasher.hexdigest(), have
        headers = {**remote.headers, "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with self.client.stream("GET", remote.url, headers=headers) as r:
                if r.status_code == 416 and have:
                    return self._after_416(r, part, hasher, have)
                self._check_status(t, r)
                if r.status_code == 206:
                    start = _content_range_start(r.headers.get("Content-Range", ""))
                    if start != have:
                        part.unlink(missing_ok=True)
                        raise Transient(f"the server resumed at byte {start}, not {have}; starting over")
                elif have:
                    self.log(f"{PROG}: {t.entry.label}: the server ignored the Range request; starting over")
                    have, hasher = 0, hashlib.sha256()
                if size is None:
                    length = r.headers.get("Content-Length")
                    size = have + int(length) if length and length.isdigit() else None
                with self.progress.file(t.entry.name, size, have) as on_bytes, part.open("ab" if have else "wb") as f:
                    limit = None if size is None else size - have
                    have += stream_body(r.iter_raw(), f, hasher, self.cfg.hash_mode == "thread", on_bytes, limit)
                    f.flush()
                    os.fsync(f.fileno())
        except httpx2.TransportError as exc:
            raise Transient(f"{type(exc).__name__}: {exc or 'connection failed'}") from None
        except Oversize as exc:
            part.unlink(missing_ok=True)
            raise FetchError(f"{t.entry.label}: {exc}; the downloaded file was deleted") from None
        if size is not None and have < size:
            raise Transient(f"the body ended after {have} of {size} bytes")
        return hasher.hexdigest(), have

    def _after_416(self, r: httpx2.Response, part: Path, hasher: Any, have: int) -> tuple[str, int]:
        """Range not satisfiable: the kept part may already be whole (size unknown beforehand)."""
        total = r.headers.get("Content-Range", "").rpartition("/")[2]
        if total.isdigit() and int(total) == have:
            return hasher.hexdigest(), have
        part.unlink(missing_ok=True)
        raise Transient(f"the server refused to resume at byte {have}; starting over")

    def _check_status(self, t: Target, r: httpx2.Response) -> None:
        if r.status_code in (200, 206):
            return
        host = urlsplit(str(r.url)).netloc
        if r.status_code in TRANSIENT_STATUS:
            raise Transient(f"{host} answered {r.status_code}")
        if r.status_code in (401, 403):
            token = (f"the token from secret {t.token_name} was refused" if t.token
                     else "no token was sent (name one in the entry's 'secret' field)")
            raise FetchError(f"{t.entry.label}: {host} answered {r.status_code} for {t.entry.source.describe()}: "
                             f"{token}")
        raise FetchError(f"{t.entry.label}: {host} answered {r.status_code} for {t.entry.source.describe()}")


def _content_range_start(value: str) -> int | None:
    """The first byte of ``bytes a-b/n``."""
    if not value.startswith("bytes "):
        return None
    first = value[6:].partition("-")[0]
    return int(first) if first.isdigit() else None
