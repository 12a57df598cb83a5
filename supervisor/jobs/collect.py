"""Collecting a finished prompt's outputs: what ComfyUI reports, read from disk, returned as base64 or bucket URLs.

This is the step after the prompt ended; what a file is, its order and its encoding are
:mod:`supervisor.jobs.outputs`, the bucket is :mod:`supervisor.jobs.storage`. ``/history`` is asked first and
the ``executed`` events are the fallback. The reported files outside the job's folder are noted on the job for
the cleanup. Without a bucket, a result over MAX_OUTPUT_BYTES is refused before anything is encoded.
"""

from __future__ import annotations

import asyncio

from supervisor.comfy.client import ComfyClient
from supervisor.errors import ComfyUnavailableError, OutputTooLargeError
from supervisor.jobs.cleanup import files_to_delete
from supervisor.jobs.execution import absorb_history
from supervisor.jobs.inputs import ComfyDirs
from supervisor.jobs.job import Job
from supervisor.jobs.outputs import (
    JobOutput,
    LoadedFile,
    OutputRef,
    collect_refs,
    encode,
    load_files,
    merge_ui_outputs,
    serialised_size,
)
from supervisor.jobs.storage import BucketStorage, Upload


async def collect_outputs(
    job: Job, client: ComfyClient, dirs: ComfyDirs, storage: BucketStorage | None, max_output_bytes: int
) -> list[JobOutput]:
    """The job's outputs in workflow order: presigned URLs with a bucket, else base64 (within the size limit)."""
    refs = await _reported_files(job, client, dirs)
    files = await _read(job, refs, dirs)
    if storage is not None:
        urls = await storage.upload_all(job.job_id, [Upload(f.filename, f.data, f.media_type) for f in files])
        return [_output(f, url, "s3_url") for f, url in zip(files, urls)]
    size = serialised_size(files, job.request.warnings + tuple(job.warnings))
    if size > max_output_bytes:
        raise OutputTooLargeError(
            f"Output too large: about {_mb(size)} as base64, over the {_mb(max_output_bytes)} "
            "limit (MAX_OUTPUT_BYTES); configure a bucket (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
            "BUCKET_SECRET_ACCESS_KEY) to receive URLs instead, or choose image_format jpeg or webp",
            details={"estimated_bytes": size, "files": len(files)},
        )
    encoded = await asyncio.gather(*(asyncio.to_thread(encode, f.data) for f in files))
    return [_output(f, data, "base64") for f, data in zip(files, encoded)]


async def _reported_files(job: Job, client: ComfyClient, dirs: ComfyDirs) -> list[OutputRef]:
    """Every file ComfyUI reports for the prompt; those outside the job folder are noted for the cleanup."""
    try:
        entry = await client.history(job.prompt_id)
    except ComfyUnavailableError:
        entry = None  # the events already told which files were written
    if entry is not None:
        absorb_history(job, entry)
    ui = merge_ui_outputs(entry.get("outputs") if entry else None, job.executed)
    refs = collect_refs(ui, job.request.workflow, job.cached)
    job.extra_files = files_to_delete(job, refs, dirs)
    return refs


async def _read(job: Job, refs: list[OutputRef], dirs: ComfyDirs) -> list[LoadedFile]:
    """The files from disk, re-encoded as the request asks; missing ones become warnings."""
    req = job.request
    files, warnings = await load_files(refs, dirs, include_temp=req.include_temp, image_format=req.image_format,
                                       quality=req.image_quality, graph=req.workflow)
    job.warnings.extend(warnings)
    if not files:
        job.warnings.append("the workflow finished but produced no output files")
    return files


def _output(f: LoadedFile, data: str, kind: str) -> JobOutput:
    return JobOutput(filename=f.filename, node_id=f.ref.node_id, media_type=f.media_type, size=len(f.data),
                     data=data, kind=kind, type=f.ref.type)  # type: ignore[arg-type]


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"
