"""The job engine: run one workflow on ComfyUI, from a request's inputs to its outputs.

``JobEngine.run_job(job_id, request, on_progress)`` is the whole life of a job, independent of how it arrived
(RunPod or the self-hosted API). This module orders the steps and owns what outlives a job (the sessions, the
node catalog, the late cleanups); each step's work is in the module named after it:

1. parse the request (:mod:`supervisor.jobs.request`) and resolve its images -- decoded, downloaded through the
   SSRF guard, verified (:mod:`supervisor.jobs.inputs`). A bad input fails here, before ComfyUI hears of the job;
2. wait until the supervisor says ComfyUI is serving, and note which process (generation) that is;
3. preflight against ``/object_info`` (:mod:`supervisor.jobs.preflight`): node classes, installed models, images
   that were neither supplied nor present; unknown inputs become warnings;
4. upload the images into ``input/<job folder>/``, rewrite the inputs naming them, and give every output
   node's ``filename_prefix`` the job folder (:mod:`supervisor.jobs.graph`), so outputs are isolated, cleanup
   is one folder and ComfyUI's cache cannot replay a file of an earlier job;
5. open the websocket with a client id of the job's own, then ``POST /prompt``; follow the events of this
   prompt only (progress to ``on_progress``, throttled) until ``executing`` with ``node: null``. A dropped
   websocket is reopened and ``/history`` checked -- only while the supervisor reports the same ComfyUI
   process; if ComfyUI died or was restarted the job fails at once with the exit and its last log lines
   (:mod:`supervisor.jobs.execution`). If it died before the prompt started, the job is queued again, once;
6. read every reported file from disk in workflow order, re-encode if asked, return base64 or upload to the
   bucket and return presigned URLs; refuse results over MAX_OUTPUT_BYTES when there is no bucket
   (:mod:`supervisor.jobs.collect`);
7. remove the job's input and output folders (unless KEEP_OUTPUTS) (:mod:`supervisor.jobs.cleanup`).

The deadline (``timeout_s``) and cancellation of the task both interrupt the running prompt or delete the
queued one, wait (bounded) until ComfyUI has let go of it, clean up, and then fail with
:class:`~supervisor.errors.JobTimeoutError` or re-raise ``CancelledError``. Every failure is one
:class:`~supervisor.errors.JobError`; nothing else escapes. The job's own state is :mod:`supervisor.jobs.job`.

The worker never knows whether it talks to ComfyUI or to the test stand-in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from supervisor.comfy.client import ComfyClient, ComfyUploadError
from supervisor.comfy.status import ComfyHandle, Status
from supervisor.config import Settings
from supervisor.errors import (
    UPLOAD_PREFIX,
    VALIDATION_PREFIX,
    ComfyUnavailableError,
    InternalError,
    InvalidInputError,
    JobError,
    JobTimeoutError,
    ValidationError,
)
from supervisor.jobs.cleanup import Cleaner, shielded
from supervisor.jobs.collect import collect_outputs
from supervisor.jobs.execution import PromptRun
from supervisor.jobs.graph import rewrite_inputs, rewrite_prefixes
from supervisor.jobs.inputs import ComfyDirs, ResolvedInputs, comfy_dirs, resolve_inputs
from supervisor.jobs.job import Job, JobResult, Progress, ProgressCallback, job_folder
from supervisor.jobs.netguard import GuardedFetcher
from supervisor.jobs.outputs import JobOutput
from supervisor.jobs.preflight import NodeCatalog, PreflightReport, preflight
from supervisor.jobs.request import JobRequest, parse_request
from supervisor.jobs.storage import BucketStorage
from supervisor.metrics import WorkerMetrics

log = logging.getLogger("supervisor.jobs")

LATE_S = 1.0  # a timed-out job that ends later than this past its deadline says when it ended
REQUEUES = 1  # a job whose ComfyUI died before the job started is queued again on the restarted one, once


class JobEngine:
    """Runs jobs on the supervised ComfyUI. One per worker; safe for concurrent ``run_job`` calls."""

    def __init__(self, settings: Settings, comfy: ComfyHandle, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.comfy = comfy
        self.metrics = metrics or WorkerMetrics.disabled()
        self.dirs: ComfyDirs = comfy_dirs(settings)
        self._session: aiohttp.ClientSession | None = None
        self._client: ComfyClient | None = None
        self._fetcher: GuardedFetcher | None = None
        self._storage = BucketStorage(settings) if settings.s3_enabled else None
        self._catalog: NodeCatalog | None = None
        self._catalog_lock = asyncio.Lock()
        self._cleaner = Cleaner(settings, comfy, self.dirs, lambda: self.client)

    # --- lifecycle -----------------------------------------------------------------------------------

    @property
    def client(self) -> ComfyClient:
        if self._client is None or self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(trust_env=False)
            self._client = ComfyClient(self._session, self.comfy.base_url)
        return self._client

    @property
    def fetcher(self) -> GuardedFetcher | None:
        if not self.settings.allow_url_inputs:
            return None
        if self._fetcher is None:
            self._fetcher = GuardedFetcher(self.settings.url_input_allowlist, timeout_s=self.settings.url_input_timeout_s)
        return self._fetcher

    async def close(self) -> None:
        """Finish late cleanups (bounded), then close the sessions."""
        await self._cleaner.close()
        if self._fetcher is not None:
            await self._fetcher.close()
        if self._storage is not None:
            await self._storage.close()
        if self._session is not None:
            await self._session.close()
        self._session = self._client = self._fetcher = None

    # --- the job ------------------------------------------------------------------------------------

    async def run_job(
        self, job_id: str, request: Mapping[str, Any] | JobRequest | Any, on_progress: ProgressCallback | None = None
    ) -> JobResult:
        """Run one job to its result, or raise one JobError (CancelledError when the task is cancelled)."""
        started = time.monotonic()
        try:
            req = request if isinstance(request, JobRequest) else parse_request(request, self.settings)
            job = Job(job_id=job_id, request=req, folder=job_folder(job_id))
            return await self._run(job, on_progress, started)
        except (JobError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job_id)
            raise InternalError(f"Internal error of the worker: {type(exc).__name__}: {exc}") from exc

    async def _run(self, job: Job, on_progress: ProgressCallback | None, started: float) -> JobResult:
        try:
            result = await self._run_steps(job, on_progress, started)
        except JobError as err:
            err.warnings.extend(w for w in (*job.request.warnings, *job.warnings) if w not in err.warnings)
            log.warning("job %s failed (%s): %s", job.job_id, err.kind, err.message)
            raise
        except asyncio.CancelledError:
            log.info("job %s cancelled while %s", job.job_id, job.stage)
            raise
        log.info("job %s: %d output(s) in %.2f s", job.job_id, len(result.outputs), result.timings["total_s"])
        return result

    async def _run_steps(self, job: Job, on_progress: ProgressCallback | None, started: float) -> JobResult:
        """Every step; the cleanup runs whatever happens."""
        progress = Progress(on_progress, self.settings.progress_interval_s, job)
        timings: dict[str, float] = {}
        try:
            await self._run_prompt(job, progress, timings, started)
            mark = time.monotonic()
            job.stage = "collecting the outputs"
            outputs = await collect_outputs(job, self.client, self.dirs, self._storage, self.settings.max_output_bytes)
            timings["outputs_s"] = time.monotonic() - mark
            self.metrics.phase("outputs", timings["outputs_s"])
            self.metrics.outputs_returned(sum(o.size for o in outputs))
        finally:
            await shielded(self._cleaner.cleanup(job))
        timings["total_s"] = time.monotonic() - started
        timings.update(job.timestamps)
        return _result(job, outputs, timings)

    async def _run_prompt(self, job: Job, progress: Progress, timings: dict[str, float], started: float) -> None:
        """Inputs to the prompt's end, within the deadline; if they end early, ComfyUI must let go of the prompt."""
        deadline = asyncio.get_running_loop().time() + job.request.timeout_s
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                resolved = await resolve_inputs(job.request, self.settings, self.fetcher)
                timings["inputs_s"] = time.monotonic() - started
                self.metrics.phase("inputs", timings["inputs_s"])
                self.metrics.inputs_received(resolved.total_bytes)
                await self._attempts(job, resolved, progress, timings, deadline)
        except TimeoutError:
            if not timeout.expired():
                raise
            stage = job.stage
            note = await self._cleaner.abandon(job)
            raise timed_out(job, stage, note, time.monotonic() - started) from None
        except asyncio.CancelledError:
            await shielded(self._cleaner.abandon(job))
            raise
        except Exception:  # a JobError, or a bug: either way ComfyUI must let go of the prompt
            await self._cleaner.abandon(job)
            raise

    async def _attempts(
        self, job: Job, resolved: ResolvedInputs, progress: Progress, timings: dict[str, float], deadline: float
    ) -> None:
        """Run the prompt; if ComfyUI died before it started, run it again on the restarted ComfyUI (REQUEUES)."""
        for attempt in range(REQUEUES + 1):
            job.stage = "waiting for ComfyUI to be ready"
            status = await self._wait_ready(job, deadline - asyncio.get_running_loop().time())
            run = PromptRun(job, self.client, self.comfy, self.settings)
            try:
                graph = await self._prepare(job, resolved, status, run)
                mark = time.monotonic()
                await run.execute(graph, progress, self._catalog)
                timings["comfy_s"] = time.monotonic() - mark
                self.metrics.phase("comfyui", timings["comfy_s"])
                return
            except ComfyUnavailableError as err:
                if attempt == REQUEUES or not job.never_started():
                    raise
                self._requeue(job, err)
            finally:
                run.stop()

    @staticmethod
    def _requeue(job: Job, err: ComfyUnavailableError) -> None:
        log.warning("job %s: %s; the job had not started, so it is queued again once ComfyUI is back",
                    job.job_id, err.message)
        job.warnings.append(f"ComfyUI restarted before this job started ({err.message}); it was queued again")
        job.next_attempt()

    async def _wait_ready(self, job: Job, timeout_s: float) -> Status:
        try:
            status = await self.comfy.wait_ready(max(timeout_s, 0.001))
        except RuntimeError as exc:
            raise self.client.unreachable(f"the supervisor is not serving ({exc})") from None
        except TimeoutError:
            raise JobTimeoutError(
                f"Job timed out after {job.request.timeout_s:g} s while waiting for ComfyUI to be ready",
                details={"state": self.comfy.status().state.value},
            ) from None
        job.generation, job.pid = status.generation, status.pid
        return status

    # --- before queueing ----------------------------------------------------------------------------

    async def _prepare(self, job: Job, resolved: ResolvedInputs, status: Status, run: PromptRun) -> dict[str, Any]:
        """Preflight, upload the inputs, and return the graph to queue (rewritten for this job)."""
        job.stage = "checking the workflow"
        resolved = await self._check(job, resolved, status, run)
        job.stage = "uploading the input images"
        uploaded = await self._upload(job, resolved, run)
        graph = rewrite_inputs(job.request.workflow, resolved, uploaded)
        graph, unprefixed = rewrite_prefixes(graph, job.folder)
        for node_id in unprefixed:
            warning = (
                f"{job.node_text(node_id)} takes its filename_prefix from another node, so its files are not in the "
                "job's own folder; they are read from what ComfyUI reports and deleted afterwards"
            )
            if warning not in job.warnings:
                job.warnings.append(warning)
        return graph

    async def _check(self, job: Job, resolved: ResolvedInputs, status: Status, run: PromptRun) -> ResolvedInputs:
        """Preflight against this ComfyUI; the inputs to upload (inline images a node takes as STRING stay)."""
        graph = job.request.workflow
        catalog = await self._catalog_for(run, status.generation)
        takes_string = {k for k in resolved.inline if catalog.input_type(graph[k[0]]["class_type"], k[1]) == "STRING"}
        resolved = resolved.without_inline(takes_string)
        report = self._preflight(graph, catalog, resolved, status)
        if report.missing_names:
            catalog = await self._catalog_for(run, status.generation, refresh=True)
            report = self._preflight(graph, catalog, resolved, status)
        job.warnings.extend(w for w in report.warnings if w not in job.warnings)  # (again, on a requeue)
        if report.problems:
            raise ValidationError.with_problems(VALIDATION_PREFIX, report.problems)
        return resolved

    def _preflight(
        self, graph: dict[str, Any], catalog: NodeCatalog, resolved: ResolvedInputs, status: Status
    ) -> PreflightReport:
        return preflight(
            graph, catalog, supplied=[img.name for img in resolved.files if img.origin.startswith("images[")],
            inline=resolved.inline.keys(), dirs=self.dirs, import_failures=status.import_failures,
        )

    async def _catalog_for(self, run: PromptRun, generation: int, refresh: bool = False) -> NodeCatalog:
        """``/object_info``, fetched once per ComfyUI process and again when asked (a name was not found)."""
        async with self._catalog_lock:
            current = self._catalog
            if current is None or current.generation != generation or refresh:
                info = await run.call(run.client.object_info())
                self._catalog = NodeCatalog(info, generation)
            return self._catalog

    async def _upload(self, job: Job, resolved: ResolvedInputs, run: PromptRun) -> dict[str, str]:
        """Upload every input into the job's folder; name -> the value LoadImage must hold."""
        if not resolved.files:
            return {}

        async def one(name: str, data: bytes) -> str:
            return await run.client.upload_image(data, name, job.folder)

        try:
            refs = await run.call(asyncio.gather(*(one(f.name, f.data) for f in resolved.files)))
        except ComfyUploadError as exc:
            raise InvalidInputError(f"{UPLOAD_PREFIX}: {exc}") from None
        return {f.name: ref for f, ref in zip(resolved.files, refs)}


def timed_out(job: Job, stage: str, note: str | None, elapsed_s: float) -> JobTimeoutError:
    """``Job timed out after N s while <stage>``, then what it took to end: the real time, and a restart if any."""
    message = f"Job timed out after {job.request.timeout_s:g} s while {stage}"
    if note:
        message += f"; {note}"
    if note or elapsed_s > job.request.timeout_s + LATE_S:
        message += f"; the job ended {elapsed_s:.1f} s after it started"
    return JobTimeoutError(message, details={"prompt_id": job.prompt_id, "node": job.node,
                                             "elapsed_s": round(elapsed_s, 3), "comfy_restarted": bool(note)})


def _result(job: Job, outputs: list[JobOutput], timings: dict[str, float]) -> JobResult:
    return JobResult(
        job_id=job.job_id,
        prompt_id=job.prompt_id,
        outputs=outputs,
        errors=list(job.request.warnings) + job.warnings,
        timings={k: round(v, 4) if isinstance(v, float) else v for k, v in timings.items()},
        response_format=job.request.response_format,
    )
