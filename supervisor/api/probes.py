"""The probes: ``/health`` (liveness), ``/ready`` (readiness) and ``/ping`` (RunPod's load balancer). No auth.

An orchestrator asks two different questions, and a worker that merely restarts ComfyUI must answer them
differently: *is it alive?* (else kill it) and *should it get jobs now?* (else route around it).

* ``/health``: RunPod's ``jobs``/``workers`` counts and the supervisor's status; 200 unless the supervisor is
  ``failed`` (the worker is exiting and should be replaced). A ComfyUI restart is not a reason to kill it.
* ``/ready``: 200 only while ComfyUI serves (``ready`` or ``degraded``, warm-up done), the worker is not
  draining and the queue is below ``MAX_QUEUE``; otherwise 503 with the reason and ``Retry-After``.
* ``/ping``: RunPod's load-balancing contract: 200 healthy, 204 initializing (starting or restarting),
  503 unhealthy (failed, or shutting down). RunPod measures a cold start from the first 204 to the first 200.
"""

from __future__ import annotations

from aiohttp import web

from supervisor.api.http_base import RETRY_AFTER_S, SERVICE, SETTINGS, public
from supervisor.api.http_middleware import errors_middleware
from supervisor.api.job_service import JobService
from supervisor.comfy.status import State
from supervisor.config import Settings

INITIALIZING = (State.STARTING, State.RESTARTING)


@public
async def handle_health(request: web.Request) -> web.Response:
    status, body = await request.app[SERVICE].health()
    return web.json_response(body, status=status)


@public
async def handle_ready(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    ready, reason = service.readiness()
    body = {"ready": ready, "reason": reason, "state": service.supervisor.status().state.value,
            "inQueue": len(service.queue), "inProgress": service.running()}
    if ready:
        return web.json_response(body)
    return web.json_response(body, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})


@public
async def handle_ping(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    state = service.supervisor.status().state
    if state.serving and service.accepting:
        return web.json_response({"status": "healthy"})
    if state in INITIALIZING:
        return web.Response(status=204)
    _, reason = service.readiness()
    return web.json_response({"status": "unhealthy", "reason": reason}, status=503,
                             headers={"Retry-After": str(RETRY_AFTER_S)})


def add_probe_routes(app: web.Application) -> None:
    for prefix in ("", "/v2/{endpoint_id}"):
        app.router.add_get(f"{prefix}/health", handle_health)
        app.router.add_get(f"{prefix}/ready", handle_ready)
        app.router.add_get(f"{prefix}/ping", handle_ping)


def build_probe_app(service: JobService, settings: Settings) -> web.Application:
    """The probes alone, for RunPod's ``PORT_HEALTH`` when it differs from the API's port."""
    app = web.Application(middlewares=[errors_middleware])
    app[SERVICE] = service
    app[SETTINGS] = settings
    add_probe_routes(app)
    return app
