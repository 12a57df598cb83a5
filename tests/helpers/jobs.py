"""Test helpers of the job engine: real loopback HTTP servers, images, and a ComfyHandle over the stand-in.

Everything here is real: servers listen on 127.0.0.1 sockets, images are encoded by Pillow, the stand-in
is a real process. Fixtures are plain functions/async context managers so tests import what they need
(conftest.py is not ours to edit).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from PIL import Image

from tests.helpers.standin import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (16, 16), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



@dataclass
class LoopbackServer:
    """A real aiohttp server on 127.0.0.1 with a log of the paths it was asked for."""

    port: int
    hits: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@contextlib.asynccontextmanager
async def loopback_server(routes: dict[str, Handler], host: str = "127.0.0.1") -> AsyncIterator[LoopbackServer]:
    """Serve ``routes`` (path -> handler, GET and POST) on a free port until the block ends."""
    server = LoopbackServer(port=0)

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        server.hits.append(request.path_qs)
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server
    finally:
        await runner.cleanup()


def static(body: bytes, content_type: str = "application/octet-stream", status: int = 200) -> Handler:
    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type=content_type, status=status)

    return handler


def redirect(to: str | Callable[[], str], status: int = 302) -> Handler:
    async def handler(_request: web.Request) -> web.StreamResponse:
        target = to() if callable(to) else to
        return web.Response(status=status, headers={"Location": target})

    return handler


def slow(delay_s: float, body: bytes = b"late") -> Handler:
    async def handler(_request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(delay_s)
        return web.Response(body=body)

    return handler


def streamed(chunks: int, chunk: bytes) -> Handler:
    """A chunked response without Content-Length, so only a cap while reading can stop it."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(chunks):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    return handler


def json_response(body: Any) -> Handler:
    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.json_response(body)

    return handler


@contextlib.contextmanager
def moto_s3_server() -> Any:
    """A real S3-protocol server (moto in server mode) as its own process on 127.0.0.1; yields its URL."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_bucket(endpoint: str, bucket: str, key_id: str = "test-key-id", secret: str = "test-secret-key") -> None:
    import boto3

    client = boto3.session.Session().client("s3", endpoint_url=endpoint, aws_access_key_id=key_id,
                                            aws_secret_access_key=secret, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    client.close()


# --- the engine on a real supervisor running the stand-in ----------------------------------------------

SEEDS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "seeds"


def seed_body(name: str) -> dict[str, Any]:
    """A seed fixture's job body (``{"input": ...}``)."""
    return json.loads((SEEDS_DIR / name).read_text())


def seed_models(*names: str) -> dict[str, list[str]]:
    """The union of the model files the named seed fixtures need (tests/fixtures/seeds/models.json)."""
    table = json.loads((SEEDS_DIR / "models.json").read_text())
    merged: dict[str, list[str]] = {}
    for name in names:
        for key, files in table[name].items():
            merged.setdefault(key, [])
            merged[key] += [f for f in files if f not in merged[key]]
    return merged


@dataclass
class Rig:
    """A real ComfySupervisor running the stand-in, its settings, and what the tests look at."""

    sup: Any
    settings: Any
    env: dict[str, str]
    root: Path

    @property
    def request_log(self) -> Path:
        return Path(self.env["STANDIN_REQUEST_LOG"])

    def requests(self) -> list[dict[str, Any]]:
        try:
            lines = self.request_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def job_files(self) -> list[Path]:
        """Every file left in ComfyUI's input, output and temp folders."""
        data = Path(self.settings.data_dir)
        return sorted(p for sub in ("input", "output", "temp") for p in (data / sub).rglob("*") if p.is_file())

    def engine(self, **changes: Any) -> Any:
        from supervisor.jobs.engine import JobEngine

        return JobEngine(self.settings.replace(**changes) if changes else self.settings, self.sup)

    def comfy_get(self, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(self.sup.base_url + path, timeout=5) as resp:
            return json.loads(resp.read() or b"null")


@contextlib.contextmanager
def supervisor_rig(tmp_path: Path, *, models: dict[str, list[str]] | None = None, target: Any = None,
                   **env: Any) -> Any:
    """Start a real ComfySupervisor on the stand-in with ``env`` (STANDIN_* knobs, worker settings), or on
    ``target`` (a ``ComfyTarget``: the stand-in or the real ComfyUI; the STANDIN_* knobs mean nothing to the
    real one). ``models``: small dummy files, whose names are all validation looks at."""
    import time

    from tests.helpers.standin import write_model_file
    from tests.helpers.worker import running_supervisor, settings_for, worker_env

    root = Path(tmp_path)
    for key, names in (models or {}).items():
        for name in names:
            write_model_file(root / "models" / key / name)
    if target is not None:
        env = {**target.env, **env}
    full_env = worker_env(root, STANDIN_REQUEST_LOG=str(root / "requests.jsonl"), WEBSOCKET_RECONNECT_DELAY_S="0.2",
                          WEBSOCKET_RECONNECT_ATTEMPTS="3", PROGRESS_INTERVAL_S="0", **env)
    with running_supervisor(full_env) as sup:
        deadline = time.monotonic() + (target.start_timeout_s if target is not None else 30)
        while not sup.status().state.serving:
            if time.monotonic() > deadline:
                raise AssertionError(f"supervisor not serving: {sup.status()} {sup.log_tail(40)}")
            time.sleep(0.02)
        yield Rig(sup=sup, settings=settings_for(full_env), env=full_env, root=root)


def decode_png(data_b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(data_b64)))
    img.load()
    return img


class TcpProxy:
    """A loopback TCP proxy in front of ComfyUI that a test can cut: ``drop()`` closes every live connection
    (the websocket sees an abnormal close, like a network drop), ``refuse`` makes new connections fail."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.refuse = False
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def start(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def drop(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class ProxiedHandle:
    """The real supervisor's ComfyHandle, with ComfyUI's address replaced by a proxy's."""

    def __init__(self, sup: Any, base_url: str) -> None:
        self._sup = sup
        self.base_url = base_url

    def status(self) -> Any:
        return self._sup.status()

    def wait_ready(self, timeout: float | None) -> Any:
        return self._sup.wait_ready(timeout)

    def wait_exit(self, generation: int) -> Any:
        return self._sup.wait_exit(generation)

    def log_tail(self, n: int = 20) -> list[str]:
        return self._sup.log_tail(n)

    def restart(self, generation: int, reason: str) -> Any:
        return self._sup.restart(generation, reason)
