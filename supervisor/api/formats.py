"""Response formats: what a finished job looks like to the client that sent it.

One job result (:class:`~supervisor.jobs.job.JobResult`) or one failure (:class:`~supervisor.errors.JobError`) is
turned into the shape a given client was written for. The format is chosen per deployment
(``RESPONSE_FORMAT``) and per request (``input.response_format``). On RunPod the platform wraps the handler's
return value in ``output``; the self-hosted API does the same, so the shapes below are ``output``:

===============  ====================================================  ===========================================
format           success (``output``)                                  failure
===============  ====================================================  ===========================================
worker-comfyui   ``{"images": [{"filename", "type", "data"}],          job FAILED, ``error`` = the message
                 "errors": [...]}``; ``type`` is ``base64`` or
                 ``s3_url``; other media in ``"files"``
mime             ``{"images": [{"filename", "data", "type"}]}``,       job FAILED, ``error`` = the message
                 ``type`` = the media type (``image/png``)
results          ``{"status": "completed", "results":                  job COMPLETED with ``{"status": "error" |
                 [{"filename", "image"}]}``                            "timeout", "message"}`` (seed 000)
base64-list      ``{"images": ["<base64 or URL>", ...]}``              job FAILED, ``error`` = the message
===============  ====================================================  ===========================================

Still images (``image/*``) go to ``images`` (``results`` for seed 000); any other file (video, audio, ...)
goes to ``files`` in the same item shape, a key that is present only when there are such files. With a
bucket configured the presigned URL stands where base64 would.

Everything returned here is plain JSON (str, int, float, bool, None, list, dict): the RunPod SDK silently
drops a result it cannot serialise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.config import RESPONSE_FORMATS
from supervisor.errors import JobError, JobTimeoutError

COMPLETED = "COMPLETED"
FAILED = "FAILED"
TIMED_OUT = "TIMED_OUT"
CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class Outcome:
    """How a finished job ends: its RunPod status, and ``output`` (COMPLETED) or ``error`` (the others)."""

    status: str
    output: Any = None
    error: str | None = None

    def handler_return(self) -> dict[str, Any]:
        """The value a RunPod handler returns for this outcome (the SDK turns ``{"error"}`` into FAILED)."""
        if self.status == COMPLETED:
            return self.output
        return {"error": self.error or "the job failed"}


def requested_format(raw_input: Any, default: str) -> str:
    """The request's ``response_format`` when it names a known format, else the deployment's ``default``.

    Read before parsing, so that even a request the job engine refuses is answered in the format its
    client understands.
    """
    if isinstance(raw_input, Mapping):
        value = raw_input.get("response_format")
        if isinstance(value, str) and value.strip().lower() in RESPONSE_FORMATS:
            return value.strip().lower()
    return default


def error_text(err: JobError) -> str:
    """The job's ``error``: one line that says what happened, then the detail (problems, ComfyUI's last lines)."""
    return err.describe()


def _is_image(output: Any) -> bool:
    return str(getattr(output, "media_type", "")).startswith("image/")


def _item(output: Any, fmt: str) -> Any:
    if fmt == "worker-comfyui":
        return {"filename": output.filename, "type": output.kind, "data": output.data}
    if fmt == "mime":
        return {"filename": output.filename, "data": output.data, "type": output.media_type}
    if fmt == "results":
        return {"filename": output.filename, "image": output.data}
    return output.data  # base64-list


def success(result: Any, fmt: str) -> Outcome:
    """A finished job's ``output`` in format ``fmt``."""
    fmt = fmt if fmt in RESPONSE_FORMATS else "worker-comfyui"
    images = [_item(o, fmt) for o in result.outputs if _is_image(o)]
    files = [_item(o, fmt) for o in result.outputs if not _is_image(o)]
    body: dict[str, Any]
    if fmt == "results":
        body = {"status": "completed", "results": images}
    else:
        body = {"images": images}
    if files:
        body["files"] = files
    if fmt == "worker-comfyui":
        body["errors"] = [str(e) for e in result.errors]
    return Outcome(COMPLETED, output=body)


def failure(err: JobError, fmt: str) -> Outcome:
    """A failed job in format ``fmt``: TIMED_OUT when its own deadline passed, FAILED otherwise.

    The ``results`` format (seed 000) reports failures inside a COMPLETED job, as that seed's handler did.
    """
    text = error_text(err)
    timed_out = isinstance(err, JobTimeoutError)
    if fmt == "results":
        return Outcome(COMPLETED, output={"status": "timeout" if timed_out else "error", "message": text})
    return Outcome(TIMED_OUT if timed_out else FAILED, error=text)


def unwrapped(body: dict[str, Any]) -> Any:
    """A ``/runsync`` job body without RunPod's envelope (``RUNSYNC_ENVELOPE=output``, ``?envelope=output``).

    A finished job answers what its handler returned, as the whole body: the ``output`` when COMPLETED (for the
    ``results`` format that is ``{"status": "completed" | "error" | "timeout", ...}``, seed 000), else
    ``{"error": message}``, as a RunPod handler returns a failure. A job still queued or running keeps the
    envelope (``{"id", "status"}``), so the client can poll ``/status``.
    """
    status = body.get("status")
    if status == COMPLETED:
        return body.get("output")
    if status in (FAILED, TIMED_OUT, CANCELLED):
        return {"error": body.get("error") or f"the job ended {status}"}
    return body
