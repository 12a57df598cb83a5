"""Request bodies, read within their limits, and JSON bodies checked before any handler acts on them.

Every body the API reads is read here: by :func:`intake_middleware` for every route (the whole body, before
the handler runs, capped by ``MAX_REQUEST_BYTES``), or by :func:`read_capped` for a route with its own cap (the
Deploy facade's upload). Both give the body ``BODY_TIMEOUT_S`` to arrive: a client that sends its body slowly,
or stops half-way, gets a 408 instead of holding its connection forever. A body that its ``Content-Encoding``
cannot decode, a chunked body that is malformed, bytes that are not UTF-8, JSON nested too deep or holding text
that cannot be stored (lone surrogates) are refused with a 400 that says which; never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, ContentLengthError, TransferEncodingError

from supervisor.api.http_base import SETTINGS, RequestRefused
from supervisor.api.safe_json import MAX_JSON_DEPTH, json_problem

CHUNK = 64 * 1024


def _payload_problem(request: web.Request, exc: BaseException) -> str:
    """What was wrong with a body aiohttp could not read, without echoing any of it."""
    cause = exc.__cause__ or exc
    if isinstance(cause, ContentEncodingError):
        encoding = request.headers.get("Content-Encoding", "").strip()[:40]
        return (f"the request body is not valid {encoding!r} data (Content-Encoding: {encoding}); send the body "
                "compressed as declared, or without Content-Encoding")
    if isinstance(cause, TransferEncodingError):
        return "the request body is not valid chunked data (Transfer-Encoding: chunked)"
    if isinstance(cause, ContentLengthError):
        return "the request body ended before its Content-Length"
    return "the request body could not be read"


@contextlib.asynccontextmanager
async def body_deadline(request: web.Request) -> AsyncIterator[None]:
    """Reading a body within ``BODY_TIMEOUT_S``; a slow, broken or undecodable body becomes a RequestRefused."""
    timeout = request.app[SETTINGS].body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise RequestRefused(408, f"the request body did not arrive within {timeout:g} s (BODY_TIMEOUT_S); send "
                                  "it at once after the headers", close=True) from None
    except web.RequestPayloadError as exc:
        raise RequestRefused(400, _payload_problem(request, exc), close=True) from None
    except ConnectionResetError:
        raise RequestRefused(400, "the client closed the connection before its body arrived", close=True) from None


@web.middleware
async def intake_middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """Read every body whole before the handler runs (``request.read()`` then answers from memory)."""
    if request.body_exists and not getattr(request.match_info.handler, "own_limit", False):
        async with body_deadline(request):
            await request.read()  # capped by the app's client_max_size: MAX_REQUEST_BYTES, else 413
    return await handler(request)


async def read_capped(request: web.Request, limit: int, too_large: str) -> bytes:
    """The body of a route with its own size cap, streamed; 413 with ``too_large`` beyond ``limit`` bytes."""
    data = bytearray()
    async with body_deadline(request):
        async for chunk in request.content.iter_chunked(CHUNK):
            data += chunk
            if len(data) > limit:
                raise RequestRefused(413, too_large, close=True)
    return bytes(data)


async def json_body(request: web.Request, hint: str = "") -> Any:
    """The body as JSON that can be stored and sent back, or a RequestRefused (400) that says what is wrong.

    JSON is UTF-8 (RFC 8259) whatever charset the Content-Type claims.
    """
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestRefused(400, f"the request body is not UTF-8 (byte {exc.start} is 0x{raw[exc.start]:02x}); "
                                  f"send JSON encoded as UTF-8{hint}") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise RequestRefused(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels{hint}") from None
    except ValueError as exc:
        raise RequestRefused(400, f"the request body is not JSON ({exc}){hint}") from None
    problem = json_problem(value)
    if problem:
        raise RequestRefused(400, f"the request body cannot be accepted: {problem}")
    return value
