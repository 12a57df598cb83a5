"""The self-hosted API's connections: bounded in number, timed until their headers arrive, refused in JSON.

aiohttp keeps a connection open as long as its client likes (an hour between requests, forever while a request
trickles in) and answers some requests itself, before any route or middleware runs, in plain text that may
echo what the client sent. A hostile client on ``0.0.0.0`` can use both. Here, at the level of the connection:

* At most ``MAX_CONNECTIONS`` are open (fewer if the open-file limit leaves less room: :func:`connection_limit`).
  Beyond that, the oldest connection that is not inside a request (idle, or still sending its headers) is
  closed to make room, so ``/health`` still gets through while hundreds of slow clients hang on; when every
  connection is busy with a request, the new one gets a 503 and is closed.
* A connection must send complete request headers within ``HEADER_TIMEOUT_S`` of opening (or of its previous
  response): a 408 if it sent part of them, an ordinary close if it sent nothing. Bodies have their own
  deadline (``BODY_TIMEOUT_S``, :mod:`supervisor.api.http_intake`).
* What the HTTP parser refuses (a bad method, bad characters, ``Content-Length`` with ``Transfer-Encoding``,
  a line over 8190 bytes...) and an ``Expect`` aiohttp would refuse before any middleware runs (in plain text,
  or with a 500 when it cannot encode the value it echoes) get the documented ``{"error": ...}`` body. The
  parser's own message names the problem; the bytes it quotes are never repeated, in the reply or in the log,
  since they may hold the API key.
* Each of these conditions, and the process running out of file descriptors, is logged at most once per
  interval (:class:`~supervisor.api.log_throttle.LogThrottle`), not once per event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from supervisor.api.http_base import error_response
from supervisor.api.log_throttle import LogThrottle
from supervisor.config import Settings

log = logging.getLogger("supervisor.api")

LINGER_S = 1.0  # after an answer that left part of a body unread, how long that rest is drained before closing
FD_RESERVE = 256  # file descriptors kept for everything but client connections: journal, ComfyUI, images, logs
_QUOTED_RE = re.compile(r"[:\s]+b?['\"].*$")  # where a parser message starts quoting the bytes it got


def connection_limit(configured: int) -> int:
    """``MAX_CONNECTIONS``, lowered to what the open-file limit leaves once ``FD_RESERVE`` is set aside."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - FD_RESERVE >= configured:
        return configured
    room = max(soft - FD_RESERVE, 1)
    log.warning("MAX_CONNECTIONS=%d is more than the open-file limit (%d) leaves room for: at most %d connections",
                configured, soft, room)
    return room


def raw_json_response(status: int, message: str) -> bytes:
    """A complete ``Connection: close`` answer, written straight to a transport outside any request."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    if status == 503:
        head += "Retry-After: 1\r\n"
    return (head + "\r\n").encode() + body


def describe_refusal(exc: BaseException | None) -> str:
    """What the parser found wrong, in its own words, cut before the bytes it quotes (they may hold a secret)."""
    if isinstance(exc, LineTooLong):
        return f"the request line or a header line is longer than {exc.args[1]} bytes"
    if isinstance(exc, BadHttpMethod):
        if "HTTPS" in exc.message:
            return "HTTPS traffic on an HTTP port (use http://)"
        return "the request does not start with a valid HTTP method"
    text = getattr(exc, "message", "") or ""
    first = (text.splitlines() or [""])[0]
    first = _QUOTED_RE.sub("", first).strip().rstrip(":").strip()
    return "".join(c for c in first if c.isprintable())[:120] or "malformed request"


class ConnectionGuard:
    """The open connections of one server, oldest first; makes room or refuses beyond the limit."""

    def __init__(self, limit: int, header_timeout_s: float, throttle: LogThrottle) -> None:
        self.limit = limit
        self.header_timeout_s = header_timeout_s
        self.throttle = throttle
        self._open: dict[GuardedRequestHandler, None] = {}

    @property
    def count(self) -> int:
        return len(self._open)

    def admit(self, conn: "GuardedRequestHandler") -> bool:
        if len(self._open) >= self.limit:
            victim = next((c for c in self._open if not c.in_request), None)
            if victim is None:
                self.throttle.event("connections-busy", logging.WARNING,
                                    "refusing new connections: all %d (MAX_CONNECTIONS) are busy with requests",
                                    self.limit)
                return False
            self.throttle.event("connections-full", logging.WARNING,
                                "%d connections open (MAX_CONNECTIONS): closing the oldest ones not inside a "
                                "request to make room", self.limit)
            self.release(victim)
            victim.shed()
        self._open[conn] = None
        return True

    def release(self, conn: "GuardedRequestHandler") -> None:
        self._open.pop(conn, None)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler, under a :class:`ConnectionGuard`, with a header deadline and JSON refusals."""

    __slots__ = ("_guard", "_header_timer", "_sent_partial", "in_request")

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_timer: asyncio.TimerHandle | None = None
        self._sent_partial = False
        self.in_request = False

    # --- the connection's life ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._guard.admit(self):
            self._close_with(503, f"the worker has {self._guard.limit} connections busy with requests "
                                  "(MAX_CONNECTIONS); retry shortly")
            return
        self._expect_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.release(self)
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None and data:
            self._sent_partial = True
        super().data_received(data)

    def request_started(self) -> None:
        """Complete headers arrived (the server is making the request object): no header deadline now."""
        self._cancel_timer()
        self.in_request = True

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self.in_request = False
            if request.content.is_eof():
                self._expect_headers()
            # else aiohttp reads and drops the unread body for a while, then closes or keeps the connection

    def shed(self) -> None:
        """Closed to make room for a newer connection."""
        if self._sent_partial:
            self._close_with(503, "the worker is at its connection limit (MAX_CONNECTIONS); retry shortly")
        else:
            self.force_close()

    # --- the header deadline -----------------------------------------------------------------------

    def _expect_headers(self) -> None:
        self._cancel_timer()
        self._sent_partial = False
        self._header_timer = asyncio.get_running_loop().call_later(self._guard.header_timeout_s, self._headers_late)

    def _cancel_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.in_request or self.transport is None:
            return
        if not self._sent_partial:
            self.force_close()  # idle: an ordinary keep-alive close
            return
        timeout = self._guard.header_timeout_s
        self._guard.throttle.event("header-timeout", logging.INFO, "closed connections whose request headers did "
                                   "not arrive within %g s (HEADER_TIMEOUT_S)", timeout)
        self._close_with(408, f"the request headers did not arrive within {timeout:g} s (HEADER_TIMEOUT_S)")

    def _close_with(self, status: int, message: str) -> None:
        if self.transport is not None:
            self.transport.write(raw_json_response(status, message))
        self.force_close()

    # --- what aiohttp answers and logs itself ------------------------------------------------------

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The parser's refusals (4xx) and exceptions that escaped every middleware (5xx), as JSON."""
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status < 500:
            problem = describe_refusal(exc)
            self._guard.throttle.event("malformed", logging.INFO, "refused malformed HTTP requests (the latest "
                                       "from %s: %s)", request.remote, problem)
            resp = error_response(status, f"bad HTTP request: {problem}")
        elif status == 504:
            resp = error_response(504, "the request timed out inside the worker")
        else:
            super().log_exception("unexpected error answering a request from %s", request.remote, exc_info=exc)
            resp = error_response(status, "internal error of the worker (see its log)")
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A body that broke off or would not decode is the client's problem: counted, not a traceback each."""
        exc = kw.get("exc_info")
        if isinstance(exc, (web.RequestPayloadError, HttpProcessingError, ConnectionError)):
            self._guard.throttle.event("payload", logging.INFO, "dropped connections whose request body could not "
                                       "be read (the latest: %s)", type(exc.__cause__ or exc).__name__)
            return
        super().log_exception(*args, **kw)


class GuardedServer(web.Server):
    """aiohttp's low-level server, making :class:`GuardedRequestHandler` connections under one guard."""

    def __init__(self, handler: Any, request_factory: Any, guard: ConnectionGuard,
                 handler_kwargs: Mapping[str, Any]) -> None:
        self._app_handler = handler
        self._app_request_factory = request_factory
        super().__init__(self._handle, request_factory=self._start_request, **handler_kwargs)
        self.guard = guard
        self._handler_kwargs = dict(handler_kwargs)
        self._guarded_loop = asyncio.get_running_loop()

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._guarded_loop, guard=self.guard, **self._handler_kwargs)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The app's handler; an ``Expect`` it would refuse before any middleware runs is refused here, in JSON."""
        expect = request.headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            return error_response(417, "the Expect header may only be '100-continue'")
        return await self._app_handler(request)

    def _start_request(self, message: Any, payload: Any, protocol: RequestHandler, writer: Any,
                       task: Any) -> web.BaseRequest:
        if isinstance(protocol, GuardedRequestHandler):
            protocol.request_started()
        return self._app_request_factory(message, payload, protocol, writer, task)


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose server is a :class:`GuardedServer` (the app's start-up and handler unchanged)."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, *, shutdown_timeout: float,
                 **handler_kwargs: Any) -> None:
        super().__init__(app, handle_signals=False, shutdown_timeout=shutdown_timeout, **handler_kwargs)
        self.guard = guard
        self._handler_kwargs = handler_kwargs

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's start-up and freezes it
        return GuardedServer(plain.request_handler, plain.request_factory, self.guard, self._handler_kwargs)


def guarded_runner(app: web.Application, settings: Settings, throttle: LogThrottle) -> GuardedAppRunner:
    """The API's runner: ``MAX_CONNECTIONS``, ``HEADER_TIMEOUT_S``, no access log."""
    guard = ConnectionGuard(connection_limit(settings.max_connections), settings.header_timeout_s, throttle)
    # aiohttp's own keep-alive close is only a backstop behind the header deadline
    return GuardedAppRunner(app, guard, shutdown_timeout=1.0, access_log=None,
                            keepalive_timeout=settings.header_timeout_s * 2, lingering_time=LINGER_S)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, throttle: LogThrottle) -> None:
    """Out of file descriptors, asyncio logs every failed accept (thousands a second): once per interval."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            throttle.event("accept", logging.WARNING, "cannot accept connections: %s (the open-file limit is %d)",
                           context.get("exception"), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
