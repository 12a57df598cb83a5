"""The self-hosted API's gatekeeping: whether it may listen unauthenticated, the bearer token, and errors as JSON.

Every answer of the API is JSON, errors included: ``errors_middleware`` turns aiohttp's HTTP exceptions and any
unexpected exception into ``{"error": ...}``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from supervisor.api.http_base import SETTINGS, RequestRefused, error_response
from supervisor.api.journal import JournalUnavailable
from supervisor.config import Settings

log = logging.getLogger("supervisor.api")


def is_loopback(host: str) -> bool:
    """Whether ``API_HOST`` only listens on this machine (an unauthenticated API is only safe there)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def auth_refusal(settings: Settings) -> str | None:
    """Why the API must not start as configured, or None.

    ``runpod-lb`` is the one exception: RunPod's gateway authenticates every caller before it reaches the worker.
    """
    if settings.api_key or settings.allow_unauthenticated or is_loopback(settings.api_host):
        return None
    if settings.worker_mode == "runpod-lb":
        return None
    return (
        f"refusing to serve the API on {settings.api_host}:{settings.api_port} without authentication: set API_KEY "
        "(clients then send 'Authorization: Bearer <API_KEY>'), listen on 127.0.0.1 (API_HOST), or set "
        "ALLOW_UNAUTHENTICATED=true if something in front of the worker does the authentication"
    )


def token_of(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "").strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    return header  # RunPod also accepts the bare key


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestRefused as refused:
        return refused.response()
    except JournalUnavailable as exc:  # a fleet's PostgreSQL is down: the client may retry
        return error_response(503, str(exc))
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_request_bytes
        return RequestRefused(413, f"request body too large: the limit is {limit} bytes (MAX_REQUEST_BYTES)",
                              close=True).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = {404: "not found", 405: "method not allowed"}.get(exc.status, exc.reason)
        return error_response(exc.status, f"{reason}: {request.method} {request.path}")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error of the worker (see its log)")


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    route_handler = request.match_info.handler
    if settings.api_key and not getattr(route_handler, "public", False):
        token = token_of(request)
        # aiohttp decodes header bytes that are not UTF-8 as lone surrogates, which a plain encode() refuses:
        # such a header is simply a wrong key
        if token is None or not hmac.compare_digest(token.encode("utf-8", "surrogatepass"),
                                                    settings.api_key.encode("utf-8", "surrogatepass")):
            return error_response(401, "Unauthorized: send the header 'Authorization: Bearer <API_KEY>'")
    endpoint = request.match_info.get("endpoint_id")
    if endpoint is not None and settings.endpoint_id and endpoint != settings.endpoint_id:
        return error_response(404, f"no endpoint {endpoint!r} here")
    length = request.content_length
    if length is not None and length > settings.max_request_bytes and not getattr(route_handler, "own_limit", False):
        return error_response(
            413, f"request body too large: {length} bytes, the limit is {settings.max_request_bytes} (MAX_REQUEST_BYTES)")
    return await handler(request)
