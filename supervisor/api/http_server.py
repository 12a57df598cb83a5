"""The self-hosted front door: an HTTP API with RunPod's endpoint contract, so a RunPod client works unchanged.

Routes (also under ``/v2/{endpoint_id}/``, so a RunPod URL works by changing only the host):

* ``POST /run`` -> ``{"id", "status": "IN_QUEUE"}``; ``POST /runsync`` waits up to ``RUNSYNC_WAIT_S`` (or
  ``?wait=<ms>``) and answers the finished job, or its id and current status;
* ``GET|POST /status/{id}``, ``POST /cancel/{id}``, ``GET|POST /stream/{id}``, ``POST /purge-queue``;
* the probes (no auth, :mod:`supervisor.api.probes`): ``GET /health`` (liveness: RunPod's ``jobs``/``workers``
  counts plus ``comfyui``, the supervisor's status; 503 only when it failed), ``GET /ready`` (readiness) and
  ``GET /ping`` (RunPod's load balancer: 204 initializing, 200 healthy);
* ``GET /metrics`` (Prometheus, :mod:`supervisor.api.metrics_routes`) and ``GET /info`` (:mod:`supervisor.api.info`);
* ``GET /workflows``: the named workflows and their parameters;
* the ComfyUI Deploy facade (seed 004), see :mod:`supervisor.api.deploy`.

Every answer is JSON. A job body is RunPod's: ``id``, ``status`` (``IN_QUEUE``, ``IN_PROGRESS``, ``COMPLETED``,
``FAILED``, ``CANCELLED``, ``TIMED_OUT``), ``delayTime``/``executionTime`` in ms once it ran, and ``output``
or ``error`` (see :mod:`supervisor.api.formats`). Jobs are journaled (:mod:`supervisor.api.journal`); up to
``MAX_CONCURRENCY`` run at once, at most ``MAX_QUEUE`` wait (429 beyond), finished ones are kept
``JOB_RETENTION_S``. A ``webhook`` in the request receives the final job body by POST, through the SSRF guard.

SIGTERM: no new jobs (503), the queue is kept for the next start, running jobs get ``SHUTDOWN_GRACE_S`` to
finish; any still running then is FAILED saying so.

``WORKER_MODE=runpod-lb`` serves the same API to RunPod's load balancer: on ``PORT``, with the probes also on
``PORT_HEALTH`` when that differs (see :mod:`supervisor.config`).

Reference for clients: ``docs/api.md``; for operators: ``docs/operations.md``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from aiohttp import web

from supervisor.api.deploy import add_deploy_routes
from supervisor.api.http_base import SERVICE, SETTINGS
from supervisor.api.http_connections import guarded_runner, quiet_accept_errors
from supervisor.api.http_intake import intake_middleware
from supervisor.api.http_middleware import auth_middleware, errors_middleware
from supervisor.api.http_routes import add_runpod_routes
from supervisor.api.info import add_info_route
from supervisor.api.fleet_service import FleetJobService
from supervisor.api.job_service import JobService
from supervisor.api.journal import Journal
from supervisor.api.pg_journal import DB_ERRORS, PgJournal
from supervisor.api.log_throttle import LogThrottle
from supervisor.api.metrics_routes import add_metrics_route
from supervisor.api.probes import add_probe_routes, build_probe_app
from supervisor.api.workflows import WorkflowLibrary
from supervisor.comfy.status import State
from supervisor.config import Settings
from supervisor.jobs.dispatch import InstanceDispatcher
from supervisor.jobs.storage import BucketStorage
from supervisor.metrics import WorkerMetrics

log = logging.getLogger("supervisor.api")

EXIT_OK = 0
EXIT_FAILED = 1
DB_CONNECT_S = 60.0  # how long a worker of a fleet waits for PostgreSQL at start-up


def build_app(service: JobService, settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.max_request_bytes,
                          middlewares=[errors_middleware, auth_middleware, intake_middleware])
    app[SERVICE] = service
    app[SETTINGS] = settings
    add_runpod_routes(app)
    add_probe_routes(app)
    add_metrics_route(app, service.metrics, settings)
    add_info_route(app)
    add_deploy_routes(app, service, settings)
    return app


async def open_journal(settings: Settings) -> Journal | PgJournal | None:
    """SQLite under DATA_DIR, or with DATABASE_URL the fleet's PostgreSQL (retried DB_CONNECT_S; None: gave up)."""
    if not settings.database_url:
        return await Journal.open(settings.data_dir / "jobs.sqlite3")
    deadline = time.monotonic() + DB_CONNECT_S
    while True:
        try:
            journal = await PgJournal.open(settings.database_url, settings.worker_id, settings.lease_s,
                                           max_size=settings.max_concurrency + 4)
            journal.inline_max = settings.fleet_inline_max_bytes
            journal.storage = BucketStorage(settings) if settings.s3_enabled else None
            return journal
        except DB_ERRORS as exc:  # the message of a failed connection never holds the password
            if time.monotonic() > deadline:
                log.error("exiting: PostgreSQL (DATABASE_URL) cannot be reached after %g s: %s: %s", DB_CONNECT_S,
                          type(exc).__name__, exc)
                return None
            log.warning("waiting for PostgreSQL (DATABASE_URL): %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(2.0)


async def serve(settings: Settings, supervisor: Any, metrics: WorkerMetrics | None = None) -> int:
    """Run the API until SIGTERM/SIGINT (exit 0 after draining) or until the supervisor fails (exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    journal = await open_journal(settings)
    if journal is None:
        await asyncio.to_thread(supervisor.stop)
        return EXIT_FAILED
    library = WorkflowLibrary.load(settings.workflows_dir)
    dispatcher = InstanceDispatcher.for_handles(settings, supervisor.instances, metrics)
    kind = FleetJobService if settings.database_url else JobService
    service = kind(settings, supervisor, dispatcher, journal, library, metrics)
    app = build_app(service, settings)
    throttle = LogThrottle(log)
    quiet_accept_errors(loop, throttle)
    runner = guarded_runner(app, settings, throttle)
    await runner.setup()
    probes = guarded_runner(build_probe_app(service, settings), settings, throttle)
    await probes.setup()
    try:
        await web.TCPSite(runner, settings.api_host, settings.api_port).start()
        if settings.health_port is not None:
            await web.TCPSite(probes, settings.api_host, settings.health_port).start()
    except OSError as exc:
        ports = "PORT, PORT_HEALTH" if settings.worker_mode == "runpod-lb" else "API_PORT"
        log.error("cannot listen on %s:%d%s: %s (API_HOST, %s)", settings.api_host, settings.api_port,
                  f" and {settings.health_port}" if settings.health_port else "", exc.strerror or exc, ports)
        await runner.cleanup()
        await probes.cleanup()
        await journal.close()
        await asyncio.to_thread(supervisor.stop)
        return EXIT_FAILED
    await service.start()
    shown = f"[{settings.api_host}]" if ":" in settings.api_host else settings.api_host
    log.info("API listening on http://%s:%d (auth: %s; %d named workflow(s); concurrency %d; %d ComfyUI "
             "instance(s))", shown, settings.api_port, "bearer token" if settings.api_key else "none",
             len(library.workflows), settings.max_concurrency, settings.instances)
    if settings.health_port is not None:
        log.info("probes (/ping, /health, /ready) also on http://%s:%d (PORT_HEALTH)", shown, settings.health_port)
    finished = asyncio.ensure_future(asyncio.to_thread(supervisor.wait_finished))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({finished, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed = supervisor.status().state is State.FAILED and not stop.is_set()
    if failed:
        log.error("exiting: %s", (supervisor.status().message or "ComfyUI failed").splitlines()[0])
        grace = min(settings.shutdown_grace_s, 5.0)  # long enough for the running jobs to report the failure
    else:
        log.info("stop requested: no new jobs; running jobs get up to %g s (SHUTDOWN_GRACE_S)",
                 settings.shutdown_grace_s)
        supervisor.begin_shutdown()
        grace = settings.shutdown_grace_s
    stopping.cancel()
    await service.shutdown(grace)
    await runner.cleanup()
    await probes.cleanup()
    throttle.close()
    await dispatcher.close()
    await journal.close()
    await asyncio.to_thread(supervisor.stop)
    finished.cancel()
    return EXIT_FAILED if failed else EXIT_OK
