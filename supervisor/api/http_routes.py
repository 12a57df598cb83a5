"""The routes of RunPod's endpoint contract: /run, /runsync, /status, /cancel, /stream, /purge-queue.

Every route is also served under ``/v2/{endpoint_id}/``, so a RunPod client works by changing only the host.
A job body is RunPod's (see :func:`supervisor.api.job_service.job_body`); ``docs/api.md`` is the reference.
``/health`` and the other probes are :mod:`supervisor.api.probes`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from supervisor.api.formats import unwrapped
from supervisor.api.http_base import (
    SERVICE,
    error_response,
    not_found,
)
from supervisor.api.http_intake import json_body
from supervisor.api.job_service import DiskFull, Job, QueueFull, ShuttingDown
from supervisor.config import RUNSYNC_ENVELOPES

MAX_RUNSYNC_WAIT_S = 300.0


async def _job_request(request: web.Request) -> tuple[Any, str | None] | web.Response:
    """``{"input": ..., "webhook"?: ...}`` from the body, or the 400 that says what is wrong."""
    body = await json_body(request, hint="; send {\"input\": {...}}")
    if not isinstance(body, dict) or "input" not in body:
        return error_response(400, "the request body must be a JSON object with an 'input', e.g. "
                                   "{\"input\": {\"workflow\": {...}}}")
    webhook = body.get("webhook")
    if webhook is not None:
        if not isinstance(webhook, str) or not webhook.lower().startswith(("http://", "https://")):
            return error_response(400, "'webhook' must be an http(s) URL")
    return body["input"], webhook


async def _submit(request: web.Request, prefix: str = "") -> Job | web.Response:
    parsed = await _job_request(request)
    if isinstance(parsed, web.Response):
        return parsed
    job_input, webhook = parsed
    service = request.app[SERVICE]
    try:
        return await service.submit(job_input, webhook=webhook, prefix=prefix)
    except QueueFull:
        return error_response(429, f"the queue is full ({service.settings.max_queue} jobs waiting, MAX_QUEUE); "
                                   "retry later")
    except ShuttingDown:
        return error_response(503, "the worker is shutting down and takes no new jobs; retry on another worker")
    except DiskFull as exc:
        return error_response(503, str(exc))


async def handle_run(request: web.Request) -> web.Response:
    job = await _submit(request)
    if isinstance(job, web.Response):
        return job
    return web.json_response({"id": job.id, "status": job.record.status})


async def handle_runsync(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    wait_s = service.settings.runsync_wait_s
    if "wait" in request.query:
        try:
            wait_s = min(max(int(request.query["wait"]) / 1000, 0.0), MAX_RUNSYNC_WAIT_S)
        except ValueError:
            return error_response(400, "'wait' must be a number of milliseconds")
    envelope = request.query.get("envelope", service.settings.runsync_envelope).strip().lower()
    if envelope not in RUNSYNC_ENVELOPES:
        return error_response(400, f"'envelope' must be one of {', '.join(RUNSYNC_ENVELOPES)}, not {envelope!r}")
    job = await _submit(request, prefix="sync-")
    if isinstance(job, web.Response):
        return job
    await service.wait(job.id, wait_s)
    body = await service.body(job.id)
    if envelope == "output" and body is not None:
        body = unwrapped(body)
    return web.json_response(body)


async def handle_status(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    body = await request.app[SERVICE].body(job_id)
    if body is None:
        return not_found(request, job_id)
    return web.json_response(body)


async def handle_cancel(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    body = await request.app[SERVICE].cancel(job_id)
    if body is None:
        return not_found(request, job_id)
    return web.json_response(body)


async def handle_stream(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    body = await request.app[SERVICE].stream(job_id)
    if body is None:
        return not_found(request, job_id)
    return web.json_response(body)


async def handle_purge(request: web.Request) -> web.Response:
    removed = await request.app[SERVICE].purge_queue()
    return web.json_response({"removed": removed, "status": "completed"})


async def handle_workflows(request: web.Request) -> web.Response:
    library = request.app[SERVICE].library
    return web.json_response({"workflows": [library.workflows[n].summary() for n in library.names()],
                              "unusable": library.broken})


def add_runpod_routes(app: web.Application) -> None:
    for prefix in ("", "/v2/{endpoint_id}"):
        app.router.add_post(f"{prefix}/run", handle_run)
        app.router.add_post(f"{prefix}/runsync", handle_runsync)
        app.router.add_route("GET", f"{prefix}/status/{{job_id}}", handle_status)
        app.router.add_route("POST", f"{prefix}/status/{{job_id}}", handle_status)
        app.router.add_post(f"{prefix}/cancel/{{job_id}}", handle_cancel)
        app.router.add_route("GET", f"{prefix}/stream/{{job_id}}", handle_stream)
        app.router.add_route("POST", f"{prefix}/stream/{{job_id}}", handle_stream)
        app.router.add_post(f"{prefix}/purge-queue", handle_purge)
        app.router.add_get(f"{prefix}/workflows", handle_workflows)
