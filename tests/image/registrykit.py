"""A real registry on loopback, a proxy in front of it that counts every byte, and a second engine that pulls.

* :class:`Registry`: Debian's ``docker-registry`` (the reference registry, distribution 2.8) on 127.0.0.1, its
  storage in a temporary folder. Docker treats 127.0.0.0/8 registries as insecure by default: plain HTTP works.
* :class:`CountingProxy`: an aiohttp reverse proxy on 127.0.0.1 in front of it. Every push and pull goes through
  it, and it records each request's method, path, status and the body bytes that went up (request) and down
  (response): the bytes are measured on the wire at the registry, not computed from manifests.
* :class:`PullerEngine`: a second dockerd (its own data root, socket, containerd and bridge) standing for
  a RunPod worker that has the previous tag: ``docker pull`` of the new tag there downloads what it lacks.
  dockerd 20.10 keeps images in its classic layer store, which reuses a layer only on an unchanged chain below it.
* :class:`ContainerdPuller`: a containerd of its own (Debian's, the one dockerd runs on) pulling with ``ctr``:
  a content-addressed store, as Docker Engine's containerd image store and Kubernetes nodes have, which fetches
  every blob it does not have by digest, wherever the layer sits.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from tests.helpers.standin import free_port
from tests.image.imagekit import DOCKER_CLI, stop_process, wait_for

REGISTRY_BIN = "/usr/bin/docker-registry"
DOCKERD = "/usr/sbin/dockerd"
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
               "proxy-authenticate", "content-length"}
BLOB_GET = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$")
UPLOAD = re.compile(r"^/v2/.+/blobs/uploads/([^/?]+)$")


class Registry:
    """``docker-registry serve`` on a free loopback port, storage under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Registry:
        (self.root / "storage").mkdir(parents=True)
        config = self.root / "config.yml"
        config.write_text(f"""version: 0.1
log: {{level: warn, accesslog: {{disabled: true}}}}
storage: {{filesystem: {{rootdirectory: {self.root / 'storage'}}}, delete: {{enabled: true}}}}
http: {{addr: 127.0.0.1:{self.port}}}
""")
        self._log = (self.root / "registry.log").open("wb")
        self._proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=self._log, stderr=self._log)
        wait_for(self._answers, 20, f"docker-registry on 127.0.0.1:{self.port} (log: {self.root / 'registry.log'})")
        return self

    def _answers(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise AssertionError(f"docker-registry exited: {(self.root / 'registry.log').read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, 10)
            self._proc = None
            self._log.close()


@dataclass
class Exchange:
    method: str
    path: str
    status: int
    up: int  # request body bytes (client -> registry)
    down: int  # response body bytes (registry -> client)


class CountingProxy:
    """A reverse proxy that forwards to the registry and records the body bytes of every exchange."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.port = free_port()
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> CountingProxy:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="registry-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the counting proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def take(self) -> list[Exchange]:
        """The exchanges since the last call (one push, or one pull)."""
        with self._lock:
            taken, self.exchanges = self.exchanges, []
        return taken

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession(auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_read=300)) as session:
            self._session = session
            app = web.Application(client_max_size=0)
            app.router.add_route("*", "/{tail:.*}", self._forward)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        up = 0

        async def body():  # the request body, counted as it streams through
            nonlocal up
            async for chunk in request.content.iter_chunked(1 << 16):
                up += len(chunk)
                yield chunk

        # a multidict: a client sends several Accept headers (the manifest types it takes), all must pass
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS)
        has_body = request.body_exists
        async with self._session.request(request.method, self.upstream + request.raw_path, headers=headers,
                                         data=body() if has_body else None, allow_redirects=False) as upstream:
            out = web.StreamResponse(status=upstream.status, headers=CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS))
            if upstream.content_length is not None:
                out.content_length = upstream.content_length
            await out.prepare(request)
            down = 0
            if request.method != "HEAD":
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    down += len(chunk)
                    await out.write(chunk)
            await out.write_eof()
        with self._lock:
            self.exchanges.append(Exchange(request.method, request.raw_path, upstream.status, up, down))
        return out


def uploaded_blobs(exchanges: list[Exchange]) -> dict[str, int]:
    """Blob digest -> bytes uploaded for it (an upload's PATCH/PUT bodies, tied to the digest its PUT names)."""
    by_upload: dict[str, int] = {}
    digests: dict[str, str] = {}
    for e in exchanges:
        path, _, query = e.path.partition("?")
        m = UPLOAD.match(path)
        if not m or e.method not in ("PATCH", "PUT"):
            continue
        by_upload[m.group(1)] = by_upload.get(m.group(1), 0) + e.up
        if e.method == "PUT":
            digest = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("digest", "")
            digests[m.group(1)] = urllib.parse.unquote(digest)
    return {digests.get(u, f"unfinished:{u}"): n for u, n in by_upload.items()}


def downloaded_blobs(exchanges: list[Exchange]) -> dict[str, int]:
    """Blob digest -> bytes downloaded for it (GET of the blob)."""
    out: dict[str, int] = {}
    for e in exchanges:
        m = BLOB_GET.match(e.path.partition("?")[0])
        if m and e.method == "GET":
            out[m.group(1)] = out.get(m.group(1), 0) + e.down
    return out


class _Daemon:
    """A daemon of the test's own (its root folder, its socket, its log): started, asked whether it answers, stopped."""

    name = ""  # e.g. "dockerd": names the log file and the errors
    socket_name = ""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / self.socket_name
        self.log_path = root / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], timeout: float, interval: float) -> None:
        self._log = self.log_path.open("wb")
        self._proc = subprocess.Popen(argv, stdout=self._log, stderr=self._log, start_new_session=True)
        wait_for(self._answers, timeout, f"the puller {self.name} (log: {self.log_path})", interval=interval)

    def _answers(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise AssertionError(f"the puller {self.name} exited: {self.log_path.read_text()[-1500:]}")
        return self._ping()

    def _ping(self) -> bool:
        raise NotImplementedError

    def _run(self, argv: list[str], what: str, check: bool, timeout: float,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, text=True, capture_output=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{what} failed: {proc.stderr[-1500:]}")
        return proc

    def _halt(self) -> bool:
        """Stop the daemon; whether it was running (the caller then removes what it left)."""
        if self._proc is None:
            return False
        stop_process(self._proc, 30)
        self._proc = None
        self._log.close()
        return True


class PullerEngine(_Daemon):
    """A second dockerd with its own data root and socket: a machine that pulls the tags the test pushes."""

    name, socket_name = "dockerd", "docker.sock"

    def start(self) -> PullerEngine:
        for sub in ("data", "exec"):
            (self.root / sub).mkdir(parents=True)
        # A bridge of its own: with --bridge=none dockerd deletes the interface docker0 -- the first engine's.
        self.bridge = f"lp{secrets.token_hex(4)}"
        subnet = f"10.213.{secrets.randbelow(250) + 1}.1/24"
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", subnet, "dev", self.bridge], check=True)
        self._spawn([DOCKERD, f"--data-root={self.root / 'data'}", f"--exec-root={self.root / 'exec'}",
                     f"--pidfile={self.root / 'dockerd.pid'}", f"--host=unix://{self.socket}",
                     f"--bridge={self.bridge}", "--iptables=false", "--ip-masq=false", "--storage-driver=overlay2",
                     "--max-concurrent-downloads=3"], timeout=60, interval=0.3)
        return self

    def _ping(self) -> bool:
        return self.docker("info", check=False).returncode == 0

    def docker(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self._run([DOCKER_CLI, "-H", f"unix://{self.socket}", *args], f"docker {' '.join(args)} on the puller "
                         "engine", check, timeout, env={**os.environ, "DOCKER_BUILDKIT": "0"})

    def stop(self) -> None:
        if self._halt():
            subprocess.run(["ip", "link", "delete", self.bridge], check=False, capture_output=True)
            # overlay mounts are gone with the engine; the data root can go
            subprocess.run(["rm", "-rf", str(self.root / "data"), str(self.root / "exec")], check=False)


class ContainerdPuller(_Daemon):
    """containerd with its own root, state and socket; ``pull`` is ``ctr images pull`` (fetch and unpack)."""

    name, socket_name = "containerd", "containerd.sock"

    def start(self) -> ContainerdPuller:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.toml"
        config.write_text(f"""version = 2
root = "{self.root / 'root'}"
state = "{self.root / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = "{self.root / 'debug.sock'}"
""")
        self._spawn([CONTAINERD, "--config", str(config)], timeout=30, interval=0.2)
        return self

    def _ping(self) -> bool:
        return self.ctr("version", check=False).returncode == 0

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self._run([CTR, "--address", str(self.socket), "--namespace", "pull-test", *args],
                         f"ctr {' '.join(args)}", check, timeout)

    def pull(self, ref: str) -> None:
        """Fetch what the store lacks and unpack it, as a node does before it runs the image (plain HTTP: loopback)."""
        self.ctr("images", "pull", "--plain-http", ref)

    def stop(self) -> None:
        if self._halt():
            subprocess.run(["sh", "-c", f"grep ' {self.root}/' /proc/mounts | cut -d' ' -f2 | xargs -r umount -l"],
                           check=False, capture_output=True)
            subprocess.run(["rm", "-rf", str(self.root / "root"), str(self.root / "state")], check=False)


def have_registry() -> bool:
    return Path(REGISTRY_BIN).exists() and shutil.which(DOCKERD) is not None and Path(CTR).exists()
