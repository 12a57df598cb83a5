"""``GET /metrics``: the worker's Prometheus registry (:mod:`supervisor.metrics`) in the text format.

Behind the bearer key unless ``METRICS_PUBLIC=true`` (a scraper inside the cluster often has no secret to send).
In RunPod mode there is no API, so the same registry is served on ``METRICS_PORT`` when it is set, by a small
server on a thread of its own (the SDK owns the main thread's event loop).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from aiohttp import web

from supervisor.api.http_base import SETTINGS, error_response, public
from supervisor.api.http_middleware import auth_middleware, errors_middleware, is_loopback
from supervisor.config import Settings
from supervisor.metrics import WorkerMetrics

log = logging.getLogger("supervisor.api")

METRICS: web.AppKey[WorkerMetrics] = web.AppKey("metrics", WorkerMetrics)


async def handle_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if not metrics.enabled:
        return error_response(404, "metrics are turned off (METRICS_ENABLED=false)")
    body, content_type = metrics.render(request.headers.get("Accept", ""))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type  # carries its own version and charset parameters
    return response


@public
async def handle_metrics_public(request: web.Request) -> web.Response:
    return await handle_metrics(request)


def add_metrics_route(app: web.Application, metrics: WorkerMetrics, settings: Settings) -> None:
    app[METRICS] = metrics
    app.router.add_get("/metrics", handle_metrics_public if settings.metrics_public else handle_metrics)


def metrics_refusal(settings: Settings) -> str | None:
    """RunPod mode: why ``METRICS_PORT`` must not be served as configured, or None."""
    if (settings.metrics_port is None or settings.metrics_public or settings.api_key
            or settings.allow_unauthenticated or is_loopback(settings.api_host)):
        return None
    return (f"refusing to serve /metrics on {settings.api_host}:{settings.metrics_port} (METRICS_PORT) without "
            "authentication: set API_KEY (the scraper then sends 'Authorization: Bearer <API_KEY>'), set "
            "METRICS_PUBLIC=true to open it, or listen on 127.0.0.1 (API_HOST)")


def start_metrics_server(settings: Settings, metrics: WorkerMetrics) -> threading.Thread | None:
    """RunPod mode: serve ``/metrics`` on ``API_HOST:METRICS_PORT`` from a daemon thread, for the worker's life."""
    if settings.metrics_port is None or not metrics.enabled:
        return None
    thread = threading.Thread(target=asyncio.run, args=(_serve(settings, metrics),), name="metrics-server",
                              daemon=True)
    thread.start()
    return thread


async def _serve(settings: Settings, metrics: WorkerMetrics) -> None:
    app = web.Application(middlewares=[errors_middleware, auth_middleware])
    app[SETTINGS] = settings
    add_metrics_route(app, metrics, settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.api_host, settings.metrics_port).start()
    except OSError as exc:
        log.error("cannot serve /metrics on %s:%s: %s (API_HOST, METRICS_PORT); jobs are served anyway",
                  settings.api_host, settings.metrics_port, exc.strerror or exc)
        await runner.cleanup()
        return
    log.info("metrics on http://%s:%d/metrics (%s)", settings.api_host, settings.metrics_port,
             "open" if settings.metrics_public or not settings.api_key else "bearer token")
    await asyncio.Event().wait()  # until the process ends (daemon thread)
