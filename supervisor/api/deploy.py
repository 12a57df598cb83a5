"""The ComfyUI Deploy facade (seed 004) on the self-hosted API: its client works unchanged against the worker.

* ``POST /api/run`` ``{"deployment_id", "inputs", "webhook"?}`` -> ``{"run_id"}``. The deployment id names a
  named workflow (its file name, or an alias such as a ``deployment_id`` in the file; see
  :mod:`supervisor.api.workflows`); ``inputs`` are its parameters. Unknown deployments and bad inputs are refused
  at once (404 / 400) with what exists.
* ``GET /api/run?run_id=`` -> ``{"id", "created_at", "updated_at", "status": "not-started" | "running" |
  "success" | "failed", "workflow_inputs", "workflow_outputs": {"images": [{"filename", "url", "type"}]},
  "error"}``. ``url`` is the bucket's presigned URL when S3 is configured, else a route of this worker
  (``GET /api/files/{run_id}/{n}/{filename}``, same bearer auth) that serves the file until the job's
  retention (``JOB_RETENTION_S``) ends.
* ``POST /api/upload-url`` ``{"filename", "content_type"}`` -> ``{"upload_url", "file_url", "expires_at"}``:
  the client ``PUT`` s the bytes to ``upload_url`` (no header needed: the URL itself is the credential, valid
  one hour, like a presigned URL) and passes ``file_url`` as an image input of a run; the worker reads the
  file from its own disk instead of fetching the URL. ``file_url`` itself serves the file with bearer auth.
  An upload URL takes one file: once written it answers 409. ``content_type`` must be one of
  :data:`UPLOAD_MEDIA_TYPES` (the image formats the worker accepts as inputs).

Files are served as attachments (``Content-Disposition: attachment``, ``X-Content-Type-Options: nosniff``) with
an image, video or audio media type, else ``application/octet-stream``: nothing a client stored or a workflow
wrote is ever rendered by a browser as a page of this worker's origin.

All jobs of this facade are ordinary jobs of the API (same queue, journal, retention, ``/status``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import errno
import json
import logging
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web

from supervisor.api.formats import COMPLETED
from supervisor.api.http_base import error_response, public
from supervisor.api.http_intake import json_body, read_capped
from supervisor.api.job_service import DiskFull, QueueFull, ShuttingDown
from supervisor.api.journal import IN_PROGRESS, IN_QUEUE, JournalWriteError, UploadRecord, UploadTooLarge
from supervisor.api.workflows import is_named_request
from supervisor.config import Settings
from supervisor.errors import JobError, StorageError
from supervisor.jobs.outputs import media_type

log = logging.getLogger("supervisor.deploy")

UPLOAD_URL_TTL_S = 3600.0
UPLOAD_PATH_RE = re.compile(r"^/api/uploads/([A-Za-z0-9_-]{20,})/([^/]+)$")
SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._ -]")
STATUS_NAMES = {IN_QUEUE: "not-started", IN_PROGRESS: "running", COMPLETED: "success"}
DEFAULT_UPLOAD_TYPE = "application/octet-stream"
UPLOAD_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff",
                      DEFAULT_UPLOAD_TYPE)
MEDIA_ALIASES = {"image/jpg": "image/jpeg", "image/tif": "image/tiff"}


def iso(ts: float) -> str:
    """``2023-04-01T12:34:56.789Z``, as ComfyUI Deploy writes times."""
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def base_url(request: web.Request) -> str:
    """This worker's URL as the client sees it (honours X-Forwarded-Proto/-Host from a reverse proxy)."""
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip() or "http"
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{proto}://{host}"


def media_kind(declared: str | None, filename: str) -> str:
    major = (declared or "").split("/", 1)[0]
    if not major:
        major = media_type(filename).split("/", 1)[0]
    return major if major in ("image", "video", "audio") else "file"


def _safe_filename(name: Any) -> str | None:
    if not isinstance(name, str):
        return None
    name = name.strip()
    if not name or "/" in name or "\\" in name or name.startswith(".") or len(name) > 200 or "\x00" in name:
        return None
    return SAFE_NAME_RE.sub("_", name)


def upload_media_type(declared: Any) -> str | None:
    """The media type an upload is stored with (parameters dropped), or None when it is not one we take."""
    if declared is None or declared == "":
        return DEFAULT_UPLOAD_TYPE
    if not isinstance(declared, str) or not declared.isascii() or not declared.isprintable():
        return None
    media = declared.split(";", 1)[0].strip().lower()
    media = MEDIA_ALIASES.get(media, media)
    return media if media in UPLOAD_MEDIA_TYPES else None


def attachment(filename: str, declared: str) -> dict[str, str]:
    """Headers that serve a file as a download of a harmless type, whatever its name or declared type said."""
    major = declared.split("/", 1)[0]
    safe_type = declared if major in ("image", "video", "audio") and "svg" not in declared else DEFAULT_UPLOAD_TYPE
    name = SAFE_NAME_RE.sub("_", filename)[:200].lstrip(".") or "file"
    return {"Content-Type": safe_type, "Content-Disposition": f'attachment; filename="{name}"',
            "X-Content-Type-Options": "nosniff"}


class DeployFacade:
    def __init__(self, service: Any, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        self.uploads_dir = settings.data_dir / "uploads"

    # --- runs --------------------------------------------------------------------------------------------

    async def create_run(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("deployment_id"), str):
            return error_response(400, "send {\"deployment_id\": \"<deployment>\", \"inputs\": {...}}")
        deployment_id = body["deployment_id"].strip()
        inputs = body.get("inputs") or {}
        library = self.service.library
        workflow = library.find(deployment_id)
        if workflow is None:
            names = ", ".join(library.names()) or "none"
            return error_response(404, f"no deployment {deployment_id!r}; available: {names}")
        try:
            workflow.build(inputs)  # refuse bad inputs now, with the list of parameters
        except JobError as err:
            return error_response(400, err.describe())
        webhook = body.get("webhook")
        if webhook is not None and (not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))):
            return error_response(400, "'webhook' must be an http(s) URL")
        job_input = {"workflow": workflow.name, "inputs": inputs, "response_format": "worker-comfyui"}
        try:
            job = await self.service.submit(job_input, kind="deploy", webhook=webhook,
                                            meta={"deployment_id": deployment_id, "inputs": inputs})
        except QueueFull:
            return error_response(429, f"the queue is full ({self.settings.max_queue} jobs waiting, MAX_QUEUE)")
        except ShuttingDown:
            return error_response(503, "the worker is shutting down and takes no new jobs")
        except DiskFull as exc:
            return error_response(503, str(exc))
        return web.json_response({"run_id": job.id})

    async def get_run(self, request: web.Request) -> web.Response:
        run_id = request.query.get("run_id", "").strip()
        if not run_id:
            return error_response(400, "give the run: GET /api/run?run_id=<run_id>")
        rec, _job = await self.service.record(run_id)
        if rec is None:
            return error_response(404, f"run {run_id!r} not found (finished runs are kept "
                                       f"{self.settings.job_retention_s:g} s, JOB_RETENTION_S)")
        outputs: dict[str, Any] = {"images": []}
        if rec.status == COMPLETED and isinstance(rec.output, Mapping):
            base = base_url(request)
            items = list(rec.output.get("images") or []) + list(rec.output.get("files") or [])
            for index, item in enumerate(items):
                filename = str(item.get("filename", f"output_{index}"))
                if item.get("type") == "s3_url":
                    url = item.get("data")
                else:
                    url = f"{base}/api/files/{quote(rec.id)}/{index}/{quote(filename)}"
                entry = {"filename": filename, "url": url, "type": media_kind(item.get("media_type"), filename)}
                outputs["images" if entry["type"] == "image" else "files"] = (
                    outputs.get("images" if entry["type"] == "image" else "files", []) + [entry])
        error = None
        if rec.finished and rec.status != COMPLETED:
            error = rec.error or ("cancelled" if rec.status == "CANCELLED" else rec.status.lower())
        body = {
            "id": rec.id,
            "created_at": iso(rec.created_at),
            "updated_at": iso(rec.updated_at),
            "status": STATUS_NAMES.get(rec.status, "failed"),
            "workflow_inputs": rec.meta.get("inputs", {}),
            "workflow_outputs": outputs,
            "error": error,
        }
        return web.json_response(body)

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        run_id = request.match_info["run_id"]
        rec, _job = await self.service.record(run_id)
        if rec is None or rec.status != COMPLETED or not isinstance(rec.output, Mapping):
            return error_response(404, f"no finished run {run_id!r} (files are kept JOB_RETENTION_S)")
        items = list(rec.output.get("images") or []) + list(rec.output.get("files") or [])
        try:
            item = items[int(request.match_info["index"])]
        except (ValueError, IndexError):
            return error_response(404, f"run {run_id!r} has {len(items)} file(s)")
        if item.get("type") == "s3_url":
            raise web.HTTPFound(item["data"])
        data = base64.b64decode(item.get("data") or "")
        filename = str(item.get("filename", ""))
        return web.Response(body=data, headers=attachment(filename, media_type(filename)))

    # --- uploads -----------------------------------------------------------------------------------------

    async def upload_url(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if not isinstance(body, dict):
            return error_response(400, "send {\"filename\": \"input.png\", \"content_type\": \"image/png\"}")
        filename = _safe_filename(body.get("filename"))
        if filename is None:
            return error_response(400, "'filename' must be a plain file name such as input_image.png")
        content_type = upload_media_type(body.get("content_type"))
        if content_type is None:
            shown = json.dumps(body.get("content_type"))[:80]
            return error_response(400, f"'content_type' {shown} is not accepted; accepted: "
                                       + ", ".join(UPLOAD_MEDIA_TYPES))
        now = time.time()
        token = secrets.token_urlsafe(24)
        path = self.uploads_dir / token / filename
        rec = UploadRecord(token=token, filename=filename, content_type=content_type, created_at=now,
                           expires_at=now + max(UPLOAD_URL_TTL_S, self.settings.job_retention_s), path=str(path))
        try:
            await self.service.journal.add_upload(rec)
        except JournalWriteError as exc:
            return error_response(503, f"the worker cannot take uploads now: {exc}; retry later")
        base = base_url(request)
        return web.json_response({
            "upload_url": f"{base}/api/upload/{token}",
            "file_url": f"{base}/api/uploads/{token}/{quote(filename)}",
            "expires_at": iso(now + UPLOAD_URL_TTL_S),
        })

    async def put_upload(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        rec = await self.service.journal.get_upload(token)
        if rec is None or time.time() > rec.created_at + UPLOAD_URL_TTL_S:
            return error_response(404, "this upload URL is unknown or expired; ask POST /api/upload-url for a new one")
        limit = self.settings.max_input_bytes
        if request.content_length is not None and request.content_length > limit:
            return error_response(413, f"the file is {request.content_length} bytes, over the {limit} limit "
                                       "(MAX_INPUT_BYTES)")
        try:
            claimed = await self.service.journal.claim_upload(token)
        except JournalWriteError as exc:
            return error_response(503, f"the worker cannot take uploads now: {exc}; retry later")
        if not claimed:
            return error_response(409, "this upload URL was already used (each takes one file); ask POST "
                                       "/api/upload-url for a new one")
        stored = False
        try:
            data = await read_capped(request, limit, f"the file is over the {limit} bytes limit (MAX_INPUT_BYTES)")
            try:
                await self.service.journal.write_upload(rec, data)
            except UploadTooLarge as exc:
                return error_response(413, str(exc))
            except StorageError as exc:
                return error_response(503, f"the worker cannot store the upload now: {exc}; retry later")
            except (OSError, JournalWriteError) as exc:  # a full disk, mostly: say so, never a 500
                await asyncio.to_thread(shutil.rmtree, Path(rec.path).parent, True)
                what = f"disk full: {exc.strerror}" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC else exc
                return error_response(503, f"the worker cannot store the upload now: {what}; retry later")
            stored = True
        finally:
            if not stored:  # refused or broken off: the URL may be used again
                with contextlib.suppress(JournalWriteError):
                    await self.service.journal.release_upload(token)
        log.info("upload %s...: %d bytes stored as %s", token[:6], len(data), rec.filename)
        return web.Response(status=200)

    async def get_upload(self, request: web.Request) -> web.StreamResponse:
        rec = await self.service.journal.get_upload(request.match_info["token"])
        if rec is None or not rec.stored or unquote(request.match_info["filename"]) != rec.filename:
            return error_response(404, "no such uploaded file (uploads are kept JOB_RETENTION_S)")
        try:
            data = await self.service.journal.read_upload(rec)
        except (OSError, StorageError) as exc:
            return error_response(503, f"the uploaded file cannot be read now: {exc}")
        return web.Response(body=data, headers=attachment(rec.filename, rec.content_type))

    async def resolve_uploads(self, job_input: Any, job: Any) -> Any:
        """Input hook: a named-workflow input equal to one of our ``file_url`` s becomes that file's data."""
        if not is_named_request(job_input) or not isinstance(job_input.get("inputs"), Mapping):
            return job_input
        inputs = dict(job_input["inputs"])
        changed = False
        for key, value in inputs.items():
            if not isinstance(value, str) or "/api/uploads/" not in value:
                continue
            match = UPLOAD_PATH_RE.match(urlsplit(value.strip()).path)
            if not match:
                continue
            rec = await self.service.journal.get_upload(match.group(1))
            if rec is None or not rec.stored:
                continue
            data = await self.service.journal.read_upload(rec)
            inputs[key] = f"data:{rec.content_type};base64," + base64.b64encode(data).decode("ascii")
            changed = True
        return {**job_input, "inputs": inputs} if changed else job_input


def add_deploy_routes(app: web.Application, service: Any, settings: Settings) -> None:
    facade = DeployFacade(service, settings)
    service.input_hooks.append(facade.resolve_uploads)

    @public
    async def put(request: web.Request) -> web.Response:
        return await facade.put_upload(request)

    put.own_limit = True  # type: ignore[attr-defined]  # streamed with its own cap (MAX_INPUT_BYTES)
    app.router.add_post("/api/run", facade.create_run)
    app.router.add_get("/api/run", facade.get_run)
    app.router.add_post("/api/upload-url", facade.upload_url)
    app.router.add_put("/api/upload/{token}", put)
    app.router.add_get("/api/uploads/{token}/{filename}", facade.get_upload)
    app.router.add_get("/api/files/{run_id}/{index}/{filename}", facade.get_file)
