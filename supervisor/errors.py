"""Every way a job can fail, one exception class per kind.

A failed job must tell the person who sent it what went wrong in one sentence they can act on, so each
error carries:

* ``kind``     -- a stable machine word (``invalid_input``, ``validation``, ...) the front doors map to
  statuses and the chaos soak matches on;
* ``message``  -- one line, starting with the prefix the official worker documents where there is one
  ("Workflow validation failed: ...", "Workflow execution error: ...", "Failed to upload one or more input
  images: ...", "ComfyUI server (host:port) not reachable ...");
* ``problems`` -- one line per problem when there are several (the message then says how many);
* ``warnings`` -- non-fatal findings of the same job, which often explain the failure (an input the node
  does not have, so ComfyUI ignored it);
* ``details``  -- structured extras for logs and debugging (node ids, exception types, log lines). Never
  secrets: nothing here may hold bucket keys or request credentials.

Formatting into a response body is the front doors' business; this module only says what happened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

VALIDATION_PREFIX = "Workflow validation failed"
EXECUTION_PREFIX = "Workflow execution error"
UPLOAD_PREFIX = "Failed to upload one or more input images"
INVALID_PREFIX = "Invalid input"


class JobError(Exception):
    """Base of every job failure. ``str(err)`` is :meth:`describe` (the message, then one line per problem)."""

    kind: ClassVar[str] = "internal"

    def __init__(
        self,
        message: str,
        problems: Sequence[str] = (),
        details: Mapping[str, Any] | None = None,
        *,
        head: str | None = None,
    ):
        self.message = " ".join(message.split())  # guaranteed one line
        self.head = head or self.message  # what describe() puts above a list of several problems
        self.warnings: list[str] = []  # non-fatal findings of the same job (e.g. inputs ComfyUI ignores)
        self.problems: tuple[str, ...] = tuple(" ".join(p.split()) for p in problems)
        self.details: dict[str, Any] = dict(details or {})
        super().__init__(self.describe())

    @classmethod
    def with_problems(
        cls, prefix: str, problems: Sequence[str], details: Mapping[str, Any] | None = None
    ) -> "JobError":
        """``prefix: the problem`` for one problem; ``prefix: N problems: first; ...`` and the list for more.

        One problem reads as one sentence; several keep the message a single line that still names the
        first, while ``problems`` (and :meth:`describe`) list each one on its own line.
        """
        problems = [p for p in problems if p]
        if len(problems) == 1:
            return cls(f"{prefix}: {problems[0]}", problems, details)
        head = f"{prefix}: {len(problems)} problems"
        return cls(f"{head}: " + "; ".join(problems), problems, details, head=head)

    def describe(self) -> str:
        """The message, then each problem on its own line when there are several, then ComfyUI's last log lines."""
        text = self.message
        if len(self.problems) > 1:
            text = self.head + ":\n" + "\n".join(f"- {p}" for p in self.problems)
        if self.warnings:
            text += "\nWarnings:\n" + "\n".join(f"- {w}" for w in self.warnings)
        tail = self.details.get("log_tail")
        if tail:
            text += "\nComfyUI's last log lines:\n" + "\n".join(f"  {line}" for line in tail)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "problems": list(self.problems),
                "warnings": list(self.warnings), "details": self.details}


class InvalidInputError(JobError):
    """The request itself is unusable: wrong shape, bad option, bad or refused input image. ComfyUI saw nothing."""

    kind = "invalid_input"


class ValidationError(JobError):
    """The workflow cannot run here: unknown node class, model not installed, ComfyUI refused the prompt."""

    kind = "validation"


class ExecutionError(JobError):
    """ComfyUI started the prompt and a node failed (``execution_error``) or it was interrupted by someone else."""

    kind = "execution"


class JobTimeoutError(JobError):
    """The job's deadline passed; the prompt was interrupted or removed from ComfyUI's queue."""

    kind = "timeout"


class JobCancelledError(JobError):
    """The job was cancelled. ``run_job`` itself re-raises ``asyncio.CancelledError``; front doors may use this."""

    kind = "cancelled"


class ComfyUnavailableError(JobError):
    """ComfyUI cannot be reached, is not serving, crashed or was restarted while the job ran."""

    kind = "comfy_unavailable"


class OutputTooLargeError(JobError):
    """The result would exceed MAX_OUTPUT_BYTES and no bucket is configured to take the files instead."""

    kind = "output_too_large"


class StorageError(JobError):
    """Uploading outputs to the configured S3-compatible bucket failed."""

    kind = "storage"


class InternalError(JobError):
    """A bug in the worker; the message still says what was being done."""

    kind = "internal"


ERROR_KINDS: tuple[type[JobError], ...] = (
    InvalidInputError,
    ValidationError,
    ExecutionError,
    JobTimeoutError,
    JobCancelledError,
    ComfyUnavailableError,
    OutputTooLargeError,
    StorageError,
    InternalError,
)
