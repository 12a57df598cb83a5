#!/usr/bin/env python3
"""Fetch the models a models.yaml lists into a ComfyUI models tree, every byte checked against a SHA-256.

    fetch_models.py [fetch] [--dry-run] [--manifest F] [--models-dir D] [--cache D] [--jobs N] [--only NAME]
    fetch_models.py lock    [--dry-run] [--manifest F]
    fetch_models.py check   [--manifest F]

Why not ``hf_hub_download``: it never hashes what it downloads and does not resume across calls (see
docs/manifest.md). So huggingface_hub does what it is good at -- endpoint, auth, URL resolution, metadata and the
LFS sha256 -- and this script streams the body itself: the SHA-256 is computed while the bytes arrive, a cut
download keeps its ``.part`` and the next call resumes it with ``Range``, and a file is only renamed into place
once its hash is right. Tokens come from BuildKit secret files (``/run/secrets/<NAME>``) or the environment and
are never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import itertools
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import httpx2  # noqa: E402 - the HTTP client huggingface_hub 2.x ships with
from build_common import (  # noqa: E402
    DEFAULT_SECRETS_DIR,
    ConfigError,
    EnvReader,
    Redactor,
    Secrets,
    human_size,
    redacted_stdio,
)
from manifest import (  # noqa: E402
    COMMIT_RE,
    CivitaiSource,
    HfSource,
    Manifest,
    ManifestError,
    ModelEntry,
    UrlSource,
    edit_manifest_text,
    load_manifest,
    missing_hashes,
)

PROG = "fetch_models"
CHUNK = 1 << 20
PROGRESS_MODES = ("auto", "bars", "lines", "none")
HASH_MODES = ("inline", "thread")
DEFAULT_MANIFEST = HERE.parent / "models.yaml"
TRANSIENT_STATUS = (408, 425, 429, 500, 502, 503, 504)


# ------------------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class FetchConfig:
    """Every setting of the fetcher, read from the environment in one place; command-line flags override it."""

    manifest: Path = DEFAULT_MANIFEST
    models_dir: Path = Path("/opt/ComfyUI/models")
    cache_dir: Path | None = None
    hf_endpoint: str = "https://huggingface.co"
    civitai_endpoint: str = "https://civitai.com"
    secrets_dir: Path = DEFAULT_SECRETS_DIR
    jobs: int = 4
    retries: int = 5
    retry_wait_s: float = 2.0
    timeout_s: float = 60.0
    progress: str = "auto"
    progress_interval_s: float = 10.0
    hash_mode: str = "inline"

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str]) -> FetchConfig:
        r = EnvReader(env)
        comfyui_dir = r.path("COMFYUI_DIR", Path("/opt/ComfyUI")) or Path("/opt/ComfyUI")
        progress = r.string("FETCH_PROGRESS", "auto").lower()
        if progress not in PROGRESS_MODES:
            r.problems.append(f"FETCH_PROGRESS={progress!r} is not valid; accepted: {', '.join(PROGRESS_MODES)}")
            progress = "auto"
        hash_mode = r.string("FETCH_HASH_MODE", "inline").lower()
        if hash_mode not in HASH_MODES:
            r.problems.append(f"FETCH_HASH_MODE={hash_mode!r} is not valid; accepted: {', '.join(HASH_MODES)}")
            hash_mode = "inline"
        cfg = cls(
            manifest=r.path("MODELS_MANIFEST", DEFAULT_MANIFEST) or DEFAULT_MANIFEST,
            models_dir=r.path("MODELS_DIR", comfyui_dir / "models") or comfyui_dir / "models",
            cache_dir=r.path("MODEL_CACHE_DIR", None),
            hf_endpoint=r.string("HF_ENDPOINT", "https://huggingface.co").rstrip("/"),
            civitai_endpoint=r.string("CIVITAI_ENDPOINT", "https://civitai.com").rstrip("/"),
            secrets_dir=r.path("SECRETS_DIR", DEFAULT_SECRETS_DIR) or DEFAULT_SECRETS_DIR,
            jobs=r.integer("FETCH_JOBS", 4, 1, 32),
            retries=r.integer("FETCH_RETRIES", 5, 0, 100),
            retry_wait_s=r.number("FETCH_RETRY_WAIT_S", 2.0, 0, 600),
            timeout_s=r.number("FETCH_TIMEOUT_S", 60.0, 1, 3600),
            progress=progress,
            progress_interval_s=r.number("FETCH_PROGRESS_INTERVAL_S", 10.0, 0.1, 3600),
            hash_mode=hash_mode,
        )
        r.finish()
        return cfg


class FetchError(Exception):
    """One entry could not be fetched; the message is the line a user reads in the build log."""


class Transient(Exception):
    """A failure worth retrying (network cut, short body, 5xx); the kept .part is resumed."""


class Oversize(FetchError):
    """The server sent more bytes than the file has: the part is garbage and is deleted."""


class Interrupted(FetchError):
    """Ctrl-C / SIGINT: every download stops at its next chunk and keeps its part for the next run."""


STOP = threading.Event()


# ------------------------------------------------------------------------------------------------ progress


class Progress:
    """A bar per file and a total (tqdm on a terminal), or a status line every few seconds (build logs)."""

    def __init__(self, mode: str, interval_s: float, jobs: int) -> None:
        if mode == "auto":
            mode = "bars" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self.active: dict[int, list[Any]] = {}  # id -> [name, done, total]
        self.done = 0
        self.total = 0
        self.started = time.monotonic()
        self._slots = list(range(jobs, 0, -1))
        self._keys = itertools.count()
        self._stop = threading.Event()
        self._tqdm: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.mode == "bars":
            from tqdm import tqdm

            self._tqdm = tqdm
            self._total_bar = tqdm(total=0, desc="total", unit="B", unit_scale=True, unit_divisor=1024, position=0,
                                   dynamic_ncols=True, leave=True)
        elif self.mode == "lines":
            self._thread = threading.Thread(target=self._report_loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._tqdm:
            self._total_bar.close()

    def log(self, message: str) -> None:
        """One line to stderr that does not tear the bars apart."""
        if self._tqdm:
            self._tqdm.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    @contextmanager
    def file(self, name: str, total: int | None, initial: int) -> Iterator[Callable[[int], None]]:
        """Track one download attempt; yields the function to call with each chunk's byte count.

        A failed attempt takes its bytes back out of the total: the retry announces them again as resumed.
        """
        with self.lock:
            key = next(self._keys)
            slot = self._slots.pop() if self._slots else 0
            self.active[key] = [name, initial, total]
            self.total += total or 0
            self.done += initial
        bar = None
        if self._tqdm:
            self._total_bar.total = self.total
            self._total_bar.update(initial)
            bar = self._tqdm(total=total, initial=initial, desc=name[:40], unit="B", unit_scale=True,
                             unit_divisor=1024, position=slot, leave=False, dynamic_ncols=True)

        def update(n: int) -> None:
            with self.lock:
                self.active[key][1] += n
                self.done += n
            if bar is not None:
                bar.update(n)
                self._total_bar.update(n)

        ok = False
        try:
            yield update
            ok = True
        finally:
            with self.lock:
                _, got, tot = self.active.pop(key)
                if not ok:
                    self.done -= got
                    self.total -= tot or 0
                self._slots.append(slot)
            if bar is not None:
                bar.close()
                if not ok:
                    self._total_bar.total = self.total
                    self._total_bar.update(-got)

    def _report_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self.lock:
                if not self.active:
                    continue
                files = "; ".join(f"{n} {_pct(d, t)}" for n, d, t in self.active.values())
                rate = self.done / max(time.monotonic() - self.started, 1e-6)
                line = (f"{PROG}: progress {human_size(self.done)} of {human_size(self.total)} "
                        f"({_pct(self.done, self.total)}) at {human_size(int(rate))}/s -- {files}")
            print(line, file=sys.stderr, flush=True)


def _pct(done: int, total: int | None) -> str:
    return f"{100 * done / total:.0f}%" if total else human_size(done)


# ------------------------------------------------------------------------------------------------ streaming


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


# ------------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Remote:
    """Where the bytes of one entry come from right now (signed CDN URLs expire: resolved per attempt)."""

    url: str
    headers: dict[str, str] = field(repr=False)
    size: int | None = None
    sha256: str | None = None
    sha256_origin: str = ""
    commit: str | None = None


@dataclass(frozen=True)
class Target:
    entry: ModelEntry
    dest: Path
    token: str | None = field(repr=False, default=None)
    token_name: str | None = None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class Sources:
    """Resolves an entry to a :class:`Remote` using huggingface_hub for the Hub, plain HTTP elsewhere."""

    def __init__(self, cfg: FetchConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log = log

    def resolve(self, t: Target) -> Remote:
        src = t.entry.source
        if isinstance(src, HfSource):
            return self._hf(t, src)
        if isinstance(src, CivitaiSource):
            url = f"{self.cfg.civitai_endpoint}/api/download/models/{src.version_id}"
            return Remote(url, _bearer(t.token), t.entry.size)
        assert isinstance(src, UrlSource)
        return Remote(src.url, _bearer(t.token), t.entry.size)

    def _hf(self, t: Target, src: HfSource) -> Remote:
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

        endpoint = self.cfg.hf_endpoint
        token: str | bool = t.token or False  # never the library's implicit token: only what the manifest names
        url = hf_hub_url(src.repo, src.file, revision=src.revision, repo_type=src.repo_type, endpoint=endpoint)
        try:
            meta = get_hf_file_metadata(url, token=token, endpoint=endpoint, retry_on_errors=True,
                                        timeout=self.cfg.timeout_s)
            infos = HfApi(endpoint=endpoint).get_paths_info(
                src.repo, [src.file], revision=meta.commit_hash or src.revision, repo_type=src.repo_type,
                token=token)
        except Exception as exc:  # noqa: BLE001 - mapped to one line below
            raise _hf_error(exc, t, src) from None
        info = next((i for i in infos if getattr(i, "path", None) == src.file), None)
        lfs = getattr(info, "lfs", None)
        hub_sha = lfs.sha256.lower() if lfs is not None else None
        size = getattr(info, "size", None) or meta.size
        if hub_sha and meta.etag and len(meta.etag) == 64 and meta.etag.lower() != hub_sha:
            self.log(f"{PROG}: warning: {t.entry.label}: the resolve ETag {meta.etag} disagrees with the hub's LFS "
                     f"sha256 {hub_sha}; trusting the LFS metadata")
        if meta.size is not None and size is not None and meta.size != size:
            self.log(f"{PROG}: warning: {t.entry.label}: the resolve response announces {meta.size} bytes, the hub's "
                     f"file metadata {size}; using {size}")
        headers = _bearer(t.token) if _origin(meta.location) == _origin(endpoint) else {}
        return Remote(meta.location, headers, size, hub_sha, "the hub's LFS metadata", meta.commit_hash)


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _hf_error(exc: Exception, t: Target, src: HfSource) -> Exception:
    """One line for a hub failure, saying what to do; retryable network failures become Transient."""
    from huggingface_hub import errors

    where = f"{t.entry.label}: {src.describe()}"
    auth = (f"the token from secret {t.token_name} was sent" if t.token else
            "no token was sent (name one in the entry's 'secret' field)")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return FetchError(f"{where}: HF_HUB_OFFLINE is set; unset it to download")
    if isinstance(exc, errors.GatedRepoError):
        return FetchError(f"{where}: the repository is gated; {auth}; accept its conditions on the Hub with the "
                          "token's account")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return FetchError(f"{where}: repository not found or not accessible; {auth}")
    if isinstance(exc, errors.RevisionNotFoundError):
        return FetchError(f"{where}: revision {src.revision!r} does not exist")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return FetchError(f"{where}: file {src.file!r} does not exist at revision {src.revision!r}")
    if isinstance(exc, errors.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = response.status_code if response is not None else "?"
        if status in TRANSIENT_STATUS:
            return Transient(f"the hub answered {status}")
        return FetchError(f"{where}: the hub answered {status}")
    if isinstance(exc, (httpx2.TransportError, OSError)):
        return Transient(f"cannot reach the hub: {type(exc).__name__}: {exc}")
    return FetchError(f"{where}: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------------ the fetch


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

    def fetch(self, t: Target) -> str:
        """Make ``t.dest`` hold the verified file; returns how: present, cache or downloaded."""
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
            return "present"
        with self._exclusive(expected):
            if self.cache and self._from_cache(t, expected):
                return "cache"
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
        return "downloaded"

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


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class Plan:
    targets: list[Target]
    skipped: list[str]
    problems: list[str]


def plan(manifest: Manifest, cfg: FetchConfig, secrets: Secrets, only: list[str]) -> Plan:
    """Decide what to fetch: skip optional entries without their secret, refuse required ones, no network."""
    entries = [e for e in manifest.entries if not only or e.name in only or e.destination in only]
    unknown = [n for n in only if not any(n in (e.name, e.destination) for e in manifest.entries)]
    problems = [f"--only {n!r} names no entry of {manifest.path}" for n in unknown]
    targets, skipped = [], []
    for e in entries:
        token = secrets.get(e.secret) if e.secret else None
        if e.secret and token is None:
            how = f"give it as a BuildKit secret ({cfg.secrets_dir}/{e.secret}) or as environment variable {e.secret}"
            if e.optional:
                skipped.append(f"{PROG}: notice: skipping optional {e.label}: its secret {e.secret} was not supplied "
                               f"({how})")
                continue
            problems.append(f"{manifest.path}: {e.label}: needs secret {e.secret}, which was not supplied; {how}")
            continue
        if token is None and isinstance(e.source, HfSource) and e.secret is None:
            token = secrets.get("HF_TOKEN")  # like huggingface_hub: HF_TOKEN, when given, authenticates hub calls
            name = "HF_TOKEN" if token else None
        else:
            name = e.secret
        targets.append(Target(e, cfg.models_dir / e.folder / e.filename, token, name))
    problems += missing_hashes(manifest, [t.entry for t in targets])
    return Plan(targets, skipped, problems)


def print_plan(p: Plan, manifest: Manifest, cfg: FetchConfig, secrets: Secrets) -> None:
    """The --dry-run table: what would be fetched from where, with known sizes; no network is used."""
    print(f"plan for {manifest.path} -> {cfg.models_dir}" + (f" (cache {cfg.cache_dir})" if cfg.cache_dir else ""))
    total, unknown = 0, 0
    for t in p.targets:
        e = t.entry
        if e.size is None:
            unknown += 1
        else:
            total += e.size
        state = "present (will verify)" if t.dest.exists() else "to fetch"
        sha = e.sha256 or ("the hub's, fetched at build time" if isinstance(e.source, HfSource) else "MISSING (run lock)")
        secret = f", secret {e.secret}: {secrets.describe(e.secret)}" if e.secret else ""
        print(f"  {e.label}: {e.destination} <- {e.source.describe()}")
        print(f"      size {human_size(e.size)}, sha256 {sha}, {state}{secret}")
    for line in p.skipped:
        print(f"  {line}")
    sizes = human_size(total) + (f" + {unknown} file(s) of unknown size (run `lock`)" if unknown else "")
    print(f"total: {len(p.targets)} file(s), {sizes}")


# ------------------------------------------------------------------------------------------------ commands


def cmd_fetch(cfg: FetchConfig, manifest: Manifest, secrets: Secrets, dry_run: bool, only: list[str]) -> int:
    p = plan(manifest, cfg, secrets, only)
    if dry_run:
        print_plan(p, manifest, cfg, secrets)
        for problem in p.problems:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1 if p.problems else 0
    for line in p.skipped:
        print(line, file=sys.stderr)
    if p.problems:
        print(f"{PROG}: error: cannot fetch ({len(p.problems)} problem(s)):", file=sys.stderr)
        for problem in p.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    return run_targets(cfg, p.targets)


def run_targets(cfg: FetchConfig, targets: list[Target]) -> int:
    """Fetch in parallel; a failure does not stop the others (their bytes are kept for the next build)."""
    started = time.monotonic()
    failures: list[str] = []
    counts: dict[str, int] = {}
    tally = threading.Lock()
    with Progress(cfg.progress, cfg.progress_interval_s, cfg.jobs) as progress:
        fetcher = Fetcher(cfg, progress)

        def one(t: Target) -> None:
            try:
                how = fetcher.fetch(t)
            except Exception as exc:  # noqa: BLE001 - reported per entry; unexpected ones with their type
                if isinstance(exc, Interrupted):
                    line = f"{t.entry.label}: interrupted; the part is kept for the next run"
                elif isinstance(exc, FetchError):
                    line = str(exc)
                else:
                    line = f"{t.entry.label}: {type(exc).__name__}: {exc}"
                with tally:
                    failures.append(line)
                progress.log(f"{PROG}: FAILED {line}")
                return
            with tally:
                counts[how] = counts.get(how, 0) + 1
            progress.log(f"{PROG}: {how:>10}  {t.entry.destination}")

        pool = ThreadPoolExecutor(max_workers=cfg.jobs, thread_name_prefix="fetch")
        try:
            list(pool.map(one, targets))
        except KeyboardInterrupt:
            STOP.set()  # running downloads stop at their next chunk, keeping their parts
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            fetcher.close()
    summary = ", ".join(f"{n} {how}" for how, n in sorted(counts.items())) or "nothing to do"
    print(f"{PROG}: {summary} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    if failures:
        print(f"{PROG}: error: {len(failures)} entr{'y' if len(failures) == 1 else 'ies'} failed:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    return 0


def cmd_lock(cfg: FetchConfig, manifest: Manifest, secrets: Secrets, dry_run: bool) -> int:
    """Fill missing sha256 (hub LFS metadata, Civitai's published hash) and pin hf revisions to commits."""
    text = manifest.path.read_text(encoding="utf-8")
    changes: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    sources = Sources(cfg, lambda m: print(m, file=sys.stderr))
    for e in manifest.entries:
        token = secrets.get(e.secret) if e.secret else None
        if e.secret and token is None and not isinstance(e.source, CivitaiSource):  # Civitai's metadata is public
            line = f"{e.label}: needs secret {e.secret}, which was not supplied"
            if e.optional:
                print(f"{PROG}: notice: lock skips optional {line}", file=sys.stderr)
            else:
                problems.append(line)
            continue
        try:
            change = _lock_entry(e, token, cfg, sources)
        except (FetchError, Transient) as exc:
            problems.append(str(exc) if isinstance(exc, FetchError) else f"{e.label}: {exc}")
            continue
        if change:
            changes[e.index] = change
            shown = ", ".join(f"{k}: {v}" for k, v in change.items())
            print(f"{PROG}: lock {e.label}: {shown}", file=sys.stderr)
    if changes and not dry_run:
        new_text = edit_manifest_text(text, manifest, changes)
        tmp = manifest.path.with_name(f".{manifest.path.name}.lock-tmp")
        tmp.write_text(new_text, encoding="utf-8")
        os.replace(tmp, manifest.path)
        print(f"{PROG}: wrote {len(changes)} change(s) to {manifest.path}", file=sys.stderr)
    elif not changes:
        print(f"{PROG}: {manifest.path} is already locked", file=sys.stderr)
    for problem in problems:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _lock_entry(e: ModelEntry, token: str | None, cfg: FetchConfig, sources: Sources) -> dict[str, Any]:
    src = e.source
    if isinstance(src, HfSource):
        t = Target(e, Path("/nonexistent"), token, e.secret)
        remote = sources.resolve(t)
        change: dict[str, Any] = {}
        if remote.commit and not COMMIT_RE.fullmatch(src.revision):
            change["hf.revision"] = remote.commit
        if remote.sha256 is None:
            if e.sha256 is None:
                raise FetchError(f"{e.label}: the hub publishes no sha256 for {src.describe()} (not an LFS file); "
                                 "add 'sha256' by hand")
        elif e.sha256 is None:
            change["sha256"] = remote.sha256
        elif e.sha256 != remote.sha256:
            raise FetchError(f"{e.label}: the manifest pins sha256 {e.sha256} but the hub has {remote.sha256} at "
                             f"commit {remote.commit}; remove 'sha256' to accept the hub's, or pin the revision")
        if e.size is None and remote.size:
            change["size"] = remote.size
        return change
    if isinstance(src, CivitaiSource):
        if e.sha256 is not None:
            return {}
        return {"sha256": _civitai_sha256(e, src, token, cfg)}
    if e.sha256 is None:
        raise FetchError(f"{e.label}: url sources publish no hash; add 'sha256' by hand (sha256sum of the file)")
    return {}


def _civitai_sha256(e: ModelEntry, src: CivitaiSource, token: str | None, cfg: FetchConfig) -> str:
    """Civitai publishes each file's SHA256 in its public model-version API."""
    url = f"{cfg.civitai_endpoint}/api/v1/model-versions/{src.version_id}"
    try:
        with httpx2.Client(timeout=cfg.timeout_s, follow_redirects=True) as client:
            r = client.get(url, headers=_bearer(token))
    except httpx2.TransportError as exc:
        raise FetchError(f"{e.label}: cannot reach {cfg.civitai_endpoint}: {type(exc).__name__}: {exc}") from None
    if r.status_code != 200:
        raise FetchError(f"{e.label}: {url} answered {r.status_code}")
    files = r.json().get("files") or []
    chosen = next((f for f in files if f.get("primary")), files[0] if files else None)
    sha = ((chosen or {}).get("hashes") or {}).get("SHA256")
    if not sha:
        raise FetchError(f"{e.label}: Civitai lists no SHA256 for model version {src.version_id}")
    return sha.lower()


# ------------------------------------------------------------------------------------------------ entry point


def parse_args(argv: list[str], cfg: FetchConfig) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fetch_models.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    for name, help_text in (("fetch", "download and verify every entry (the default command)"),
                            ("lock", "fill missing sha256 and pin hf revisions to commits, in place"),
                            ("check", "validate the manifest only (no network)")):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--manifest", type=Path, default=cfg.manifest, help=f"default {cfg.manifest}")
        if name in ("fetch", "lock"):
            sp.add_argument("--dry-run", action="store_true",
                            help="fetch: print the plan and total size without network; lock: show, do not write")
        if name == "fetch":
            sp.add_argument("--models-dir", type=Path, default=cfg.models_dir, help=f"default {cfg.models_dir}")
            sp.add_argument("--cache", type=Path, default=cfg.cache_dir, help="content-addressed cache dir")
            sp.add_argument("--jobs", type=int, default=cfg.jobs, help=f"parallel downloads (default {cfg.jobs})")
            sp.add_argument("--retries", type=int, default=cfg.retries, help=f"per file (default {cfg.retries})")
            sp.add_argument("--progress", choices=PROGRESS_MODES, default=cfg.progress)
            sp.add_argument("--only", action="append", default=[], metavar="NAME",
                            help="fetch only this entry (name or folder/filename); repeatable")
    if not argv or argv[0] not in ("fetch", "lock", "check", "-h", "--help"):
        argv = ["fetch", *argv]
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    redact = Redactor()
    with redacted_stdio(redact):
        try:
            cfg = FetchConfig.from_env(os.environ)
        except ConfigError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        args = parse_args(sys.argv[1:] if argv is None else argv, cfg)
        overrides = {k: getattr(args, a) for k, a in (("manifest", "manifest"), ("models_dir", "models_dir"),
                     ("cache_dir", "cache"), ("jobs", "jobs"), ("retries", "retries"), ("progress", "progress"))
                     if hasattr(args, a)}
        cfg = dataclasses.replace(cfg, **overrides)
        secrets = Secrets(cfg.secrets_dir, os.environ)
        try:
            manifest = load_manifest(cfg.manifest)
            for name in {e.secret for e in manifest.entries if e.secret} | {"HF_TOKEN", "CIVITAI_TOKEN"}:
                redact.add(secrets.get(name))
            if args.command == "check":
                print(f"{PROG}: {manifest.path}: {len(manifest.entries)} entries, valid", file=sys.stderr)
                for problem in missing_hashes(manifest):
                    print(f"{PROG}: notice: {problem}", file=sys.stderr)
                return 0
            if args.command == "lock":
                return cmd_lock(cfg, manifest, secrets, args.dry_run)
            return cmd_fetch(cfg, manifest, secrets, args.dry_run, args.only)
        except ManifestError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; partial downloads are kept for the next run", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
