"""``GET /info`` (behind the key): what this worker is and what is inside it.

The worker's version, ComfyUI's version (asked live when ComfyUI serves, else the build's) and commit, the custom
node packs with their commits, the baked models with their sha256 (all from the image's build record,
:mod:`supervisor.build_record`, with the revision, source and build time the image's BUILD_* ENV stamps on), the
named workflows, and the image labels the record implies, so a client can compare a running worker with
``docker inspect``. A checkout has no build record: those parts are empty and ``build.record`` says so.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from supervisor import __version__
from supervisor.api.http_base import SERVICE, SETTINGS
from supervisor.api.job_service import JobService
from supervisor.build_record import BuildRecord, BuildRecordError, labels, load, stamped
from supervisor.errors import ComfyUnavailableError

log = logging.getLogger("supervisor.api")

LIVE_VERSION_TIMEOUT_S = 2.0


async def handle_info(request: web.Request) -> web.Response:
    service, settings = request.app[SERVICE], request.app[SETTINGS]
    path = settings.build_record_file
    record: BuildRecord | None = None
    try:
        record = await asyncio.to_thread(load, path)
        state = "found" if record is not None else f"none at {path} (not an image build, or BUILD_RECORD_FILE)"
    except BuildRecordError as exc:
        log.warning("the build record cannot be used: %s", exc)
        state = f"unusable: {exc}"
    record = stamped(record or BuildRecord(), settings.build_revision, settings.build_source, settings.build_created)
    body: dict[str, Any] = {
        "worker": {"version": __version__, "revision": record.worker.get("revision"),
                   "source": record.worker.get("source"), "mode": settings.worker_mode},
        "comfyui": await _comfyui(service, record),
        "custom_nodes": [dict(n) for n in record.custom_nodes],
        "models": [dict(m) for m in record.models],
        "workflows": [_workflow(service, name) for name in service.library.names()],
        "build": {"record": state, "path": str(path), "built_at": record.built_at or None},
        "labels": labels(record),
    }
    return web.json_response(body)


async def _comfyui(service: JobService, record: BuildRecord) -> dict[str, Any]:
    status = service.supervisor.status()
    version = record.comfyui.get("version")
    if status.state.serving:
        try:
            stats = await service.engine.client.system_stats(LIVE_VERSION_TIMEOUT_S)
            version = (stats.get("system") or {}).get("comfyui_version") or version
        except ComfyUnavailableError as exc:
            log.debug("/info: ComfyUI's version could not be asked: %s", exc.message)
    return {"version": version, "ref": record.comfyui.get("ref"), "commit": record.comfyui.get("commit"),
            "state": status.state.value}


def _workflow(service: JobService, name: str) -> dict[str, Any]:
    wf = service.library.workflows[name]
    return {"name": wf.name, "aliases": list(wf.aliases), "description": wf.description}


def add_info_route(app: web.Application) -> None:
    app.router.add_get("/info", handle_info)
