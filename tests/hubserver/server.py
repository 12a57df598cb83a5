#!/usr/bin/env python3
"""A loopback model server: the Hugging Face download protocol, plain HTTP with Range, a mini Civitai, fault knobs.

Standard library only, so it runs from any Python 3.11+ (the image test starts it on the host and builds against
it through host networking). It is a test double for the *remote side* of the model fetcher; everything it says
follows /work/shared/reference/hf-download.md, which was checked against the real huggingface_hub client.

Usage::

    python tests/hubserver/server.py --root DIR [--host 127.0.0.1] [--port 0] [--cdn]
        [--token TOKEN | env HUBSERVER_TOKEN] [--private org/name ...] [--gated org/name ...]
        [--civitai-private] [--civitai-token TOKEN | env HUBSERVER_CIVITAI_TOKEN] [--fault NAME=VALUE ...]

On start it prints one line ``READY {"port": P, "cdn_port": Q, "endpoint": "http://127.0.0.1:P"}`` and serves
until SIGINT/SIGTERM.

Layout of ``--root``::

    hf/<org>/<name>/<path>          a Hub repository (revisions: "main" and its commit, derived from the content)
    files/<path>                    plain HTTP at /files/<path>; anything under files/private/ needs the token
    civitai/<version_id>/<filename> a Civitai model version (one file)

Routes::

    HEAD|GET /<org>/<name>/resolve/<rev>/<path>     (datasets: /datasets/<org>/<name>/resolve/...)
    POST     /api/models/<org>/<name>/paths-info/<rev>    form: paths=a&paths=b
    GET      /api/models/<org>/<name>[/revision/<rev>]    ?blobs=true adds sizes and LFS sha256
    HEAD|GET /files/<path>
    GET      /api/download/models/<version_id>           307 to the CDN (Civitai token required with --civitai-private)
    GET      /api/v1/model-versions/<version_id>          Civitai metadata: files[].hashes.SHA256, sizeKB
    HEAD|GET /cdn/<sha256>                                 content by hash (on the CDN port when --cdn)
    POST     /_control/faults     JSON {name: value, ...} merged into the active faults
    POST     /_control/reset      clear faults and the request log
    GET      /_control/log        JSON list of {port, method, path, status, range, auth, sent}

Every file above the LFS threshold is treated as an LFS file: its ETag is its sha256 and paths-info reports
``lfs.oid``. With ``--cdn``, resolve requests of LFS files answer 302 to a second port, like the Hub's CDN;
the Authorization header must not follow (the log records ``auth`` per request so tests can check that).

Fault knobs (each body fault applies to the next ``times`` file bodies, default 1; ``times: -1`` = until reset;
``match: <substring>`` restricts a fault to request paths containing it):

    cut_after=N       send N bytes of the body, then drop the connection (a download cut mid-body)
    truncate=N        send only N bytes but announce them as the whole body (a clean but short response)
    corrupt=1         flip one byte in the middle of the body (same size, wrong sha256)
    ignore_range=1    answer 200 with the whole body even when Range was asked
    status=CODE       answer CODE (e.g. 503) instead of the body
    wrong_etag=1      resolve HEAD/GET announces a wrong ETag (metadata only)
    wrong_size=1      resolve HEAD/GET announces a wrong size (metadata only)
    rate=BYTES_PER_S  throttle bodies (applies to all bodies until reset; `times` ignored)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_THRESHOLD = 1024  # bytes; smaller files are "git" files (ETag = git blob sha1), like the Hub's 10 MB rule
BODY_FAULTS = ("cut_after", "truncate", "corrupt", "ignore_range", "status")
META_FAULTS = ("wrong_etag", "wrong_size")
ALL_FAULTS = BODY_FAULTS + META_FAULTS + ("rate", "times", "match")
CHUNK = 1 << 20


@dataclass(frozen=True)
class FileInfo:
    path: Path
    size: int
    sha256: str
    git_sha1: str

    @property
    def lfs(self) -> bool:
        return self.size >= LFS_THRESHOLD


class Store:
    """The files under --root with their hashes, computed once per (path, size, mtime)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._infos: dict[Path, tuple[tuple[int, int], FileInfo]] = {}
        self._lock = threading.Lock()

    def info(self, path: Path) -> FileInfo | None:
        try:
            st = path.stat()
        except OSError:
            return None
        if not path.is_file():
            return None
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._infos.get(path)
        if cached and cached[0] == key:
            return cached[1]
        sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % st.st_size)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                sha256.update(chunk)
                sha1.update(chunk)
        info = FileInfo(path, st.st_size, sha256.hexdigest(), sha1.hexdigest())
        with self._lock:
            self._infos[path] = (key, info)
        return info

    def safe_path(self, base: Path, rel: str) -> Path | None:
        """``base/rel`` if it stays inside base, else None."""
        candidate = (base / rel).resolve()
        base = base.resolve()
        return candidate if candidate == base or base in candidate.parents else None

    def repo_dir(self, repo: str, repo_type: str) -> Path | None:
        base = self.root / ("hf-datasets" if repo_type == "dataset" else "hf")
        path = self.safe_path(base, repo)
        return path if path is not None and path.is_dir() else None

    def repo_files(self, repo_dir: Path) -> dict[str, FileInfo]:
        files: dict[str, FileInfo] = {}
        for p in sorted(repo_dir.rglob("*")):
            if p.is_file():
                info = self.info(p)
                if info:
                    files[p.relative_to(repo_dir).as_posix()] = info
        return files

    def commit(self, repo: str, repo_dir: Path) -> str:
        """A deterministic 40-hex commit id for the repository's current content."""
        h = hashlib.sha1(f"commit:{repo}".encode())
        for rel, info in self.repo_files(repo_dir).items():
            h.update(f"{rel}:{info.sha256}\n".encode())
        return h.hexdigest()

    def by_sha256(self, sha: str) -> FileInfo | None:
        with self._lock:
            for _, info in self._infos.values():
                if info.sha256 == sha:
                    return info
        for p in self.root.rglob("*"):  # a file added after start: hash what is not known yet
            if p.is_file() and (info := self.info(p)) and info.sha256 == sha:
                return info
        return None

    def civitai(self, version_id: str) -> FileInfo | None:
        base = self.safe_path(self.root / "civitai", version_id)
        if base is None or not base.is_dir():
            return None
        files = [p for p in sorted(base.iterdir()) if p.is_file()]
        return self.info(files[0]) if files else None


class State:
    """Faults and the request log, shared by both listeners and changed at run time through /_control."""

    def __init__(self, token: str | None, private: set[str], gated: set[str], civitai_private: bool,
                 civitai_token: str | None = None) -> None:
        self.token = token
        self.civitai_token = civitai_token or token
        self.private = private
        self.gated = gated
        self.civitai_private = civitai_private
        self.faults: dict[str, Any] = {}
        self.log: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.cdn_port: int | None = None

    def set_faults(self, faults: dict[str, Any]) -> None:
        unknown = [k for k in faults if k not in ALL_FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(ALL_FAULTS)}")
        with self.lock:
            self.faults.update(faults)
            self.faults.setdefault("times", 1)

    def take_body_fault(self, path: str) -> dict[str, Any]:
        """The body faults that apply to this request, consuming one of their `times`."""
        with self.lock:
            active = {k: v for k, v in self.faults.items() if k in BODY_FAULTS and v not in (None, False, 0)}
            match = self.faults.get("match")
            if not active or (match and match not in path):
                return {"rate": self.faults.get("rate")}
            times = self.faults.get("times", 1)
            if times != -1:
                times -= 1
                if times <= 0:
                    for k in BODY_FAULTS:
                        self.faults.pop(k, None)
                    self.faults.pop("times", None)
                else:
                    self.faults["times"] = times
            return {**active, "rate": self.faults.get("rate")}

    def meta_fault(self, name: str, path: str) -> bool:
        with self.lock:
            match = self.faults.get("match")
            return bool(self.faults.get(name)) and not (match and match not in path)

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.log.append(entry)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubserver/1"
    store: Store
    state: State

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # the structured log at /_control/log replaces the access log

    def _auth(self, token: str | None = None) -> str:
        """none / ok / bad: how the request's bearer token compares with the one this route expects."""
        header = self.headers.get("Authorization")
        if not header:
            return "none"
        token = token or self.state.token
        return "ok" if token and header == f"Bearer {token}" else "bad"

    def _start(self) -> None:
        self._sent = 0
        self._status = 0
        self._entry = {
            "port": self.server.server_address[1],
            "method": self.command,
            "path": urlsplit(self.path).path,
            "range": self.headers.get("Range"),
            "auth": self._auth(),
        }

    def _finish(self) -> None:
        self._entry.update(status=self._status, sent=self._sent)
        self.state.record(self._entry)

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               content_type: str = "text/plain") -> None:
        self._status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            self._sent += len(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(obj).encode(), headers, "application/json")

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._json(status, {"error": message}, extra)

    def _dispatch(self) -> None:
        self._start()
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self._finish()

    do_GET = do_HEAD = do_POST = _dispatch

    def _route(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        segs = [s for s in path.split("/") if s]
        if segs[:1] == ["_control"]:
            return self._control(segs[1:] if len(segs) > 1 else [""])
        if segs[:1] == ["cdn"] and len(segs) == 2:
            return self._cdn(segs[1])
        if segs[:1] == ["files"] and len(segs) > 1:
            return self._files("/".join(segs[1:]))
        if segs[:3] == ["api", "download", "models"] and len(segs) == 4:
            return self._civitai_download(segs[3])
        if segs[:3] == ["api", "v1", "model-versions"] and len(segs) == 4:
            return self._civitai_meta(segs[3])
        if segs[:2] in (["api", "models"], ["api", "datasets"]):
            return self._api(segs, query)
        repo_type = "model"
        if segs[:1] == ["datasets"]:
            repo_type, segs = "dataset", segs[1:]
        if len(segs) >= 5 and segs[2] == "resolve":
            return self._resolve(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), repo_type)
        self._error(404, None, f"no route for {path}")

    # ------------------------------------------------------------------ control

    def _control(self, segs: list[str]) -> None:
        if segs[0] == "log" and self.command == "GET":
            with self.state.lock:
                log = list(self.state.log)
            return self._json(200, log)
        if segs[0] == "reset" and self.command == "POST":
            with self.state.lock:
                self.state.faults.clear()
                self.state.log.clear()
            return self._json(200, {"ok": True})
        if segs[0] == "faults" and self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            try:
                self.state.set_faults(json.loads(self.rfile.read(length) or b"{}"))
            except ValueError as exc:
                return self._json(400, {"error": str(exc)})
            with self.state.lock:
                return self._json(200, dict(self.state.faults))
        self._error(404, None, "unknown control route")

    # ------------------------------------------------------------------ hub

    def _repo_access(self, repo: str, headers: dict[str, str] | None = None) -> bool:
        """Apply private/gated rules; on refusal the error is already sent."""
        auth = self._entry["auth"]
        if repo in self.state.private and auth != "ok":
            self._error(401, "RepoNotFound", "Repository not found", headers)
            return False
        if repo in self.state.gated and auth != "ok":
            self._error(403, "GatedRepo", "Access to this repo is restricted", headers)
            return False
        return True

    def _revision(self, repo: str, repo_dir: Path, rev: str) -> str | None:
        commit = self.store.commit(repo, repo_dir)
        return commit if rev in ("main", commit) else None

    def _resolve(self, repo: str, rev: str, rel: str, repo_type: str) -> None:
        if self.command not in ("GET", "HEAD"):
            return self._error(405, None, "method not allowed")
        repo_dir = self.store.repo_dir(repo, repo_type)
        if repo_dir is None:
            return self._error(404 if repo not in self.state.private else 401, "RepoNotFound", "Repository not found")
        if not self._repo_access(repo):
            return
        commit = self._revision(repo, repo_dir, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        path = self.store.safe_path(repo_dir, rel)
        info = self.store.info(path) if path else None
        if info is None:
            return self._error(404, "EntryNotFound", f"{rel} does not exist on {rev}", {"X-Repo-Commit": commit})
        etag = info.sha256 if info.lfs else info.git_sha1
        if self.state.meta_fault("wrong_etag", self._entry["path"]):
            etag = hashlib.sha256(b"wrong" + etag.encode()).hexdigest()
        size = info.size + 4096 if self.state.meta_fault("wrong_size", self._entry["path"]) else info.size
        meta = {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}
        if info.lfs and self.state.cdn_port is not None:
            host = self.headers.get("Host", "127.0.0.1").rsplit(":", 1)[0]
            location = f"http://{host}:{self.state.cdn_port}/cdn/{info.sha256}"
            meta.update({"Location": location, "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
            return self._reply(302, b"", meta)
        if size != info.size:
            meta["X-Linked-Size"] = str(size)
        self._body(info, meta)

    def _api(self, segs: list[str], query: dict[str, list[str]]) -> None:
        repo_type = "dataset" if segs[1] == "datasets" else "model"
        if len(segs) < 4:
            return self._error(404, None, "no such API route")
        repo = f"{segs[2]}/{segs[3]}"
        repo_dir = self.store.repo_dir(repo, repo_type)
        if repo_dir is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if not self._repo_access(repo):
            return
        rest = segs[4:]
        if rest[:1] == ["paths-info"] and len(rest) == 2 and self.command == "POST":
            return self._paths_info(repo, repo_dir, unquote(rest[1]))
        if (not rest or (rest[0] == "revision" and len(rest) == 2)) and self.command == "GET":
            rev = rest[1] if rest else "main"
            return self._model_info(repo, repo_dir, rev, query.get("blobs", ["false"])[0] == "true")
        self._error(404, None, "no such API route")

    def _file_json(self, rel: str, info: FileInfo) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": rel, "size": info.size, "oid": info.git_sha1}
        if info.lfs:
            entry["lfs"] = {"oid": info.sha256, "size": info.size, "pointerSize": 134}
        return entry

    def _paths_info(self, repo: str, repo_dir: Path, rev: str) -> None:
        commit = self._revision(repo, repo_dir, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        files = self.store.repo_files(repo_dir)
        out = [self._file_json(p, files[p]) for p in form.get("paths", []) if p in files]
        self._json(200, out)

    def _model_info(self, repo: str, repo_dir: Path, rev: str, blobs: bool) -> None:
        commit = self._revision(repo, repo_dir, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        siblings = []
        for rel, info in self.store.repo_files(repo_dir).items():
            sib: dict[str, Any] = {"rfilename": rel}
            if blobs:
                sib.update(size=info.size, blobId=info.git_sha1)
                if info.lfs:
                    sib["lfs"] = {"sha256": info.sha256, "size": info.size, "pointerSize": 134}
            siblings.append(sib)
        self._json(200, {"id": repo, "modelId": repo, "sha": commit, "private": repo in self.state.private,
                         "siblings": siblings})

    # ------------------------------------------------------------------ plain files, cdn, civitai

    def _files(self, rel: str) -> None:
        if self.command not in ("GET", "HEAD"):
            return self._error(405, None, "method not allowed")
        if rel.startswith("private/") and self._entry["auth"] != "ok":
            return self._error(401, None, "a bearer token is required")
        path = self.store.safe_path(self.store.root / "files", rel)
        info = self.store.info(path) if path else None
        if info is None:
            return self._error(404, None, f"{rel} not found")
        self._body(info, {"ETag": f'"{info.sha256}"'})

    def _cdn(self, sha: str) -> None:
        info = self.store.by_sha256(sha)
        if info is None:
            return self._error(404, None, "no such object")
        self._body(info, {"ETag": f'"{info.sha256}"'})

    def _civitai_download(self, version_id: str) -> None:
        self._entry["auth"] = self._auth(self.state.civitai_token)
        if self.state.civitai_private and self._entry["auth"] != "ok":
            return self._error(401, None, "The creator of this asset requires you to be logged in to download it")
        info = self.store.civitai(version_id)
        if info is None:
            return self._error(404, None, f"model version {version_id} not found")
        host = self.headers.get("Host", "127.0.0.1").rsplit(":", 1)[0]
        port = self.state.cdn_port or self.server.server_address[1]
        headers = {"Location": f"http://{host}:{port}/cdn/{info.sha256}?name={quote(info.path.name)}"}
        self._reply(307, b"", headers)

    def _civitai_meta(self, version_id: str) -> None:
        info = self.store.civitai(version_id)
        if info is None:
            return self._error(404, None, f"model version {version_id} not found")
        base = f"http://{self.headers.get('Host', '127.0.0.1')}"
        self._json(200, {
            "id": int(version_id) if version_id.isdigit() else version_id,
            "name": f"version {version_id}",
            "files": [{
                "name": info.path.name, "sizeKB": info.size / 1024, "type": "Model", "primary": True,
                "hashes": {"SHA256": info.sha256.upper(), "AutoV2": info.sha256[:10].upper()},
                "downloadUrl": f"{base}/api/download/models/{version_id}",
            }],
        })

    # ------------------------------------------------------------------ bodies

    def _body(self, info: FileInfo, headers: dict[str, str]) -> None:
        """Send a file (or its Range) honouring the active body faults."""
        if self.command == "HEAD":
            size = int(headers.pop("X-Linked-Size", info.size))
            self._status = 200
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return
        headers.pop("X-Linked-Size", None)
        fault = self.state.take_body_fault(self._entry["path"])
        if fault.get("status"):
            return self._error(int(fault["status"]), None, "injected fault")
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if wanted and not fault.get("ignore_range"):
            start = _range_start(wanted)
            if start is None or start >= info.size:
                return self._reply(416, b"", {"Content-Range": f"bytes */{info.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{info.size - 1}/{info.size}"
        length = info.size - start
        announced = length
        if fault.get("truncate") is not None and fault.get("truncate") is not False:
            length = announced = min(int(fault["truncate"]), length)
        self._status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        cut = fault.get("cut_after")
        if cut is not None and cut is not False:
            length = min(int(cut), length)
        self._send_range(info, start, length, corrupt=bool(fault.get("corrupt")), rate=fault.get("rate"))
        if length < announced:
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_range(self, info: FileInfo, start: int, length: int, corrupt: bool, rate: float | None) -> None:
        flip_at = start + length // 2 if corrupt and length else -1
        with info.path.open("rb") as f:
            if flip_at < 0 and not rate:
                self._sendfile(f, start, length)
                return
            f.seek(start)
            pos, t0 = start, time.monotonic()
            while pos < start + length:
                chunk = bytearray(f.read(min(CHUNK if not rate else 64 * 1024, start + length - pos)))
                if not chunk:
                    break
                if pos <= flip_at < pos + len(chunk):
                    chunk[flip_at - pos] ^= 0xFF
                self.wfile.write(chunk)
                self._sent += len(chunk)
                pos += len(chunk)
                if rate:
                    ahead = (pos - start) / float(rate) - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)

    def _sendfile(self, f: Any, start: int, length: int) -> None:
        """Zero-copy body (fast enough for the hashing benchmark to measure the client, not this server)."""
        sock = self.connection
        offset, end = start, start + length
        while offset < end:
            sent = os.sendfile(sock.fileno(), f.fileno(), offset, min(end - offset, 1 << 30))
            if sent == 0:
                break
            offset += sent
            self._sent += sent


def _range_start(header: str) -> int | None:
    """The N of ``bytes=N-`` (the only form the fetcher and huggingface_hub send)."""
    value = header.strip()
    if not value.startswith("bytes=") or "," in value:
        return None
    first, _, _last = value[6:].partition("-")
    return int(first) if first.isdigit() else None


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def build(args: argparse.Namespace) -> tuple[Server, Server | None, State]:
    token = args.token or os.environ.get("HUBSERVER_TOKEN") or None
    civitai_token = args.civitai_token or os.environ.get("HUBSERVER_CIVITAI_TOKEN") or None
    state = State(token, set(args.private), set(args.gated), args.civitai_private, civitai_token)
    store = Store(Path(args.root).resolve())
    handler = type("BoundHandler", (Handler,), {"store": store, "state": state})
    main = Server((args.host, args.port), handler)
    cdn = Server((args.host, args.cdn_port), handler) if args.cdn else None
    if cdn is not None:
        state.cdn_port = cdn.server_address[1]
    faults: dict[str, Any] = {}
    for item in args.fault:
        name, _, value = item.partition("=")
        faults[name] = json.loads(value) if value else True
    if faults:
        state.set_faults(faults)
    return main, cdn, state


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="directory holding hf/, files/ and civitai/")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (see the READY line)")
    p.add_argument("--cdn", action="store_true", help="redirect LFS downloads to a second port, like the Hub's CDN")
    p.add_argument("--cdn-port", type=int, default=0)
    p.add_argument("--token", help="bearer token for private/gated repos, files/private/ and Civitai "
                   "(default: env HUBSERVER_TOKEN)")
    p.add_argument("--private", action="append", default=[], metavar="ORG/NAME", help="a repo that needs the token")
    p.add_argument("--gated", action="append", default=[], metavar="ORG/NAME", help="a gated repo (403 without token)")
    p.add_argument("--civitai-private", action="store_true", help="Civitai downloads need a token")
    p.add_argument("--civitai-token", help="the Civitai token (default: env HUBSERVER_CIVITAI_TOKEN, else --token)")
    p.add_argument("--fault", action="append", default=[], metavar="NAME=VALUE", help="a fault active from the start")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    main_server, cdn_server, state = build(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    servers = [s for s in (main_server, cdn_server) if s is not None]
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True) for s in servers]
    for t in threads:
        t.start()
    port = main_server.server_address[1]
    ready = {"port": port, "cdn_port": state.cdn_port, "endpoint": f"http://{args.host}:{port}"}
    print("READY " + json.dumps(ready), flush=True)
    stop.wait()
    for s in servers:
        s.shutdown()
        s.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
