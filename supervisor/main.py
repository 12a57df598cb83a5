"""The worker's entry point: read the settings, start ComfyUI under supervision, then serve.

ComfyUI is spawned first, before any heavy import, so its ~10 s start overlaps the worker's own start-up
(``import runpod`` alone takes ~2 s). Then one front door serves jobs until it is told to stop:
``WORKER_MODE=runpod`` the RunPod SDK's worker loop (:mod:`supervisor.api.runpod_worker`), ``http`` the
self-hosted API with RunPod's contract (:mod:`supervisor.api.http_server`), ``runpod-lb`` the same API behind
RunPod's load balancer. One metrics registry (:mod:`supervisor.metrics`) is shared by all of them.

Before anything starts, the ports it will listen on are checked (:mod:`supervisor.supervision.ports`): a
taken one stops start-up with one line naming it, before ComfyUI is spawned.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT, or ``REFRESH_WORKER`` after its job), 1 when the supervisor
is ``failed`` (crash loop: the platform should replace the worker), 2 on a configuration error (a port in use
included).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from supervisor.config import ConfigError, Settings, load_settings
from supervisor.logs import setup_logging
from supervisor.metrics import WorkerMetrics
from supervisor.supervision.pool import ComfyPool
from supervisor.supervision.leftover import stop_leftovers
from supervisor.supervision.ports import first_port_problem
from supervisor.supervision.process import restore_default_sigint

log = logging.getLogger("supervisor.main")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"comfyui-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log_level)
    restore_default_sigint()
    refusal = _listen_refusal(settings)
    if refusal:
        print(f"comfyui-worker: invalid configuration: {refusal}", file=sys.stderr)
        return EXIT_CONFIG
    for line in stop_leftovers(settings):  # ours, from a worker killed -9: any other server is refused below
        log.warning("%s", line)
    port_problem = first_port_problem(settings)
    if port_problem is not None:
        print(f"comfyui-worker: {port_problem.describe()}", file=sys.stderr)
        return EXIT_CONFIG
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # until a front door installs its own handling
    metrics = WorkerMetrics(enabled=settings.metrics_enabled)
    if settings.instances_note:
        log.info("%d ComfyUI instance(s): %s", settings.instances, settings.instances_note)
    supervisor = ComfyPool(settings, metrics)
    supervisor.start()
    if settings.worker_mode == "runpod":
        from supervisor.api.runpod_worker import (
            serve_runpod,  # imports the RunPod SDK (~2 s) while ComfyUI starts
        )

        return serve_runpod(settings, supervisor, metrics)
    from supervisor.api.http_server import serve

    return asyncio.run(serve(settings, supervisor, metrics))


def _listen_refusal(settings: Settings) -> str | None:
    """Why the worker must not listen as configured (no key on a public address), before ComfyUI starts."""
    from supervisor.api.http_middleware import auth_refusal  # light: aiohttp only
    from supervisor.api.metrics_routes import metrics_refusal

    if settings.worker_mode == "runpod":
        return metrics_refusal(settings)
    return auth_refusal(settings)


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    """SIGTERM during start-up: leave cleanly (atexit stops ComfyUI) instead of dying and orphaning it."""
    raise SystemExit(EXIT_OK)
