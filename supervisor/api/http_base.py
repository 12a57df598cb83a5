"""What every HTTP route of the self-hosted API shares: the app's keys, the JSON error body, public routes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from supervisor.api.job_service import JobService
from supervisor.config import Settings

RETRY_AFTER_S = 5  # what a 429 or 503 tells the client to wait before trying again (Retry-After)

SERVICE: web.AppKey[JobService] = web.AppKey("service", JobService)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)


def public(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a route as served without the bearer token (health, capability URLs)."""
    handler.public = True  # type: ignore[attr-defined]
    return handler


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    """``{"error": message}``; a 429 or 503 also says when to retry (``Retry-After``), as HTTP intends."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


class RequestRefused(Exception):
    """A request the API refuses before its handler does anything; answered ``{"error": message}``.

    ``close``: the connection is closed after the answer (its body was not read to the end, so the next bytes
    on it are not a request).
    """

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close

    def response(self) -> web.Response:
        resp = error_response(self.status, self.message)
        if self.close:
            resp.force_close()
        return resp


def not_found(request: web.Request, job_id: str) -> web.Response:
    retention = request.app[SETTINGS].job_retention_s
    return error_response(404, f"job {job_id!r} not found (finished jobs are kept {retention:g} s, "
                               "JOB_RETENTION_S)")
