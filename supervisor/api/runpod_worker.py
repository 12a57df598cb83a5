"""The RunPod front door: the SDK's own worker loop (``runpod.serverless.start``) with an async handler.

* Each job waits up to ``READY_WAIT_S`` for a free serving ComfyUI instance (:mod:`supervisor.jobs.dispatch`),
  then runs on that instance's job engine; progress goes out through ``runpod.serverless.progress_update``
  (throttled by ``PROGRESS_INTERVAL_S``).
* The handler returns the response format's value (:mod:`supervisor.api.formats`); a failure is returned as
  ``{"error": message}`` (the SDK marks the job FAILED with exactly that string), never raised (a raised
  exception becomes a JSON-encoded traceback). Every return value is checked to be JSON, and text in it that
  cannot be encoded as UTF-8 is escaped: the SDK silently loses a result it cannot serialise or encode. An input
  holding such text (a lone surrogate) or nested too deep fails at once, naming the field.
* The SDK cancels a stopped job's task; the engine turns that ``CancelledError`` into an interrupt (or a
  queue removal) in ComfyUI and cleans up; no result is posted, as the SDK intends.
* ``MAX_CONCURRENCY`` (by default one job per ComfyUI instance) through ``concurrency_modifier``; ``REFRESH_WORKER=true`` through the SDK's
  ``refresh_worker`` (every result carries ``stopPod: true`` and the worker exits 0 after its first job).
* SIGTERM/SIGINT are the SDK's: it stops taking jobs, lets the running ones finish and post, and returns.
* A ``failed`` supervisor (crash loop) ends the worker with exit 1: the handler stops the SDK's loop the way
  a SIGTERM does, jobs in flight fail with ComfyUI's error, and the platform replaces the worker.
* Metrics: each job is counted (``front_door="runpod"``), its wait for ComfyUI is its ``queue`` phase; with
  ``METRICS_PORT`` set the registry is served there (:mod:`supervisor.api.metrics_routes`).

The SDK reads its own environment (``RUNPOD_WEBHOOK_*``, ``RUNPOD_POD_ID``...) when it is imported; that is
the platform's contract with it, not a setting of this worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from supervisor.api.formats import Outcome, failure, requested_format, success
from supervisor.api.safe_json import json_problem, sendable
from supervisor.api.workflows import WorkflowLibrary, prepare_input
from supervisor.comfy.status import State, Status
from supervisor.config import Settings
from supervisor.errors import INVALID_PREFIX, ComfyUnavailableError, InternalError, InvalidInputError, JobError
from supervisor.metrics import WorkerMetrics

log = logging.getLogger("supervisor.runpod")

EXIT_OK = 0
EXIT_FAILED = 1
SDK_FETCH_TIMEOUT_S = 90.0  # the SDK's own bound on one job-take long-poll
SDK_LOG_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR", "CRITICAL": "ERROR"}


class RunPodHandler:
    """The handler the SDK calls for each job; one per worker."""

    def __init__(self, settings: Settings, supervisor: Any, library: WorkflowLibrary,
                 metrics: WorkerMetrics | None = None) -> None:
        from supervisor.jobs.dispatch import InstanceDispatcher

        self.settings = settings
        self.supervisor = supervisor  # the pool of ComfyUI instances
        self.library = library
        self.metrics = metrics or WorkerMetrics.disabled()
        self.dispatcher = InstanceDispatcher.for_handles(settings, supervisor.instances, self.metrics)
        self.failed = threading.Event()
        self.running = 0
        self.metrics.front_door("runpod")
        self.metrics.track_jobs(lambda: 0, lambda: self.running)  # the platform holds the queue

    async def handle(self, job: dict[str, Any]) -> Any:
        job_id = str(job.get("id", "?"))
        raw = job.get("input")
        fmt = requested_format(raw, self.settings.response_format)
        self.running += 1
        started = time.monotonic()
        try:
            outcome = await self._run(job, job_id, raw, fmt)
        except asyncio.CancelledError:
            log.info("job %s stopped by RunPod after %.2f s; ComfyUI was interrupted", job_id,
                     time.monotonic() - started)
            self.metrics.job_finished("runpod", "CANCELLED", time.monotonic() - started)
            raise
        finally:
            self.running -= 1
        self.metrics.job_finished("runpod", outcome.status, time.monotonic() - started)
        value = outcome.handler_return()
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            log.error("job %s: the result is not JSON (%s)", job_id, exc)
            value = {"error": f"Internal error of the worker: the result is not JSON ({exc})"}
        value = sendable(value)  # the SDK encodes it as UTF-8: a lone surrogate would lose the whole result
        took = time.monotonic() - started
        if outcome.error:
            log.info("job %s %s after %.2f s: %s", job_id, outcome.status, took, outcome.error.splitlines()[0])
        else:
            log.info("job %s %s in %.2f s", job_id, outcome.status, took)
        if self.failed.is_set():
            _request_stop()
        return value

    async def _run(self, job: dict[str, Any], job_id: str, raw: Any, fmt: str) -> Outcome:
        problem = json_problem(raw, "input")
        if problem:  # the platform passes on whatever JSON the client sent
            return failure(InvalidInputError(f"{INVALID_PREFIX}: {problem}"), fmt)
        waited = time.monotonic()
        try:
            instance = await self._claim_instance()
        except JobError as err:
            return failure(err, fmt)
        self.metrics.phase("queue", time.monotonic() - waited)
        status = "CANCELLED"
        try:
            outcome = await self._run_on(instance, job, job_id, raw, fmt)
            status = outcome.status
            return outcome
        finally:
            self.dispatcher.release(instance, status)

    async def _run_on(self, instance: Any, job: dict[str, Any], job_id: str, raw: Any, fmt: str) -> Outcome:
        if len(self.dispatcher.instances) > 1:
            log.info("job %s started on ComfyUI instance %s", job_id, instance.label)
        try:
            request = prepare_input(raw, self.library)
            result = await instance.engine.run_job(job_id, request, lambda event: self._progress(job, event))
            return success(result, result.response_format or fmt)
        except JobError as err:
            return failure(err, fmt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the SDK would post a JSON-encoded traceback instead
            log.exception("job %s failed unexpectedly", job_id)
            return failure(InternalError(f"Internal error of the worker: {type(exc).__name__}: {exc}"), fmt)

    async def _claim_instance(self) -> Any:
        """A free serving ComfyUI instance for this job, waiting up to READY_WAIT_S."""
        try:
            return await self.dispatcher.claim(self.settings.ready_wait_s)
        except TimeoutError as exc:
            raise ComfyUnavailableError(f"{exc} (READY_WAIT_S)") from None
        except RuntimeError as exc:
            raise ComfyUnavailableError(str(exc), details={"log_tail": self.supervisor.log_tail(20)}) from None

    @staticmethod
    def _progress(job: dict[str, Any], event: dict[str, Any]) -> None:
        import runpod

        runpod.serverless.progress_update(job, event)

    def concurrency(self, _current: int) -> int:
        return self.settings.max_concurrency

    def on_status(self, status: Status) -> None:
        """Supervisor listener (its thread): a failed supervisor ends the worker."""
        if status.state is State.FAILED and not self.failed.is_set():
            self.failed.set()
            first = (status.message or "ComfyUI failed").splitlines()[0]
            log.error("ending the worker: %s", first)
            threading.Thread(target=self._end_worker, name="end-worker", daemon=True).start()

    def _end_worker(self) -> None:
        """Stop the SDK's loop like a SIGTERM would; if it does not end in time, leave anyway (exit 1)."""
        _request_stop()
        deadline = time.monotonic() + self.settings.shutdown_grace_s + SDK_FETCH_TIMEOUT_S + 5
        while time.monotonic() < deadline:
            time.sleep(1.0)
            if self.running == 0:
                _request_stop()  # in case the SDK installed its handler after the first signal
        log.error("the RunPod worker loop did not end; exiting")
        self.supervisor.stop()
        os._exit(EXIT_FAILED)


def _request_stop() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def serve_runpod(settings: Settings, supervisor: Any, metrics: WorkerMetrics | None = None) -> int:
    """Run the SDK's worker loop until it ends; the exit code for main()."""
    failed_early = threading.Event()
    importing_sdk = threading.Event()
    deferred_exit: list[int] = []

    def early_signal(signum: int, _frame: Any) -> None:
        # Before the SDK installs its handlers: nothing was taken yet, so leave at once (atexit stops ComfyUI).
        # Not in the middle of ``import runpod``: it runs py-cpuinfo's probe as a child process, which an exit
        # raised there would leave behind.
        code = EXIT_FAILED if failed_early.is_set() else EXIT_OK
        if importing_sdk.is_set():
            deferred_exit.append(code)
            return
        raise SystemExit(code)

    signal.signal(signal.SIGTERM, early_signal)
    library = WorkflowLibrary.load(settings.workflows_dir)
    handler = RunPodHandler(settings, supervisor, library, metrics)
    if metrics is not None:
        from supervisor.api.metrics_routes import start_metrics_server

        start_metrics_server(settings, metrics)

    def listener(status: Status) -> None:
        if status.state is State.FAILED:
            failed_early.set()
        handler.on_status(status)

    supervisor.add_listener(listener)
    if supervisor.status().state is State.FAILED:
        listener(supervisor.status())

    importing_sdk.set()
    import runpod  # noqa: E402 - heavy (~2 s): imported only now, while ComfyUI starts

    importing_sdk.clear()
    if deferred_exit:
        raise SystemExit(deferred_exit[-1])
    log.info("RunPod worker loop starting (concurrency %d%s; %d ComfyUI instance(s); %d named workflow(s))",
             settings.max_concurrency, ", refresh worker after each job" if settings.refresh_worker else "",
             settings.instances, len(library.workflows))
    # The SDK parses the command line for its own flags; its log level follows LOG_LEVEL (at DEBUG it logs
    # every result in full, base64 included).
    sys.argv = sys.argv[:1] + ["--rp_log_level", SDK_LOG_LEVELS.get(settings.log_level, "INFO")]
    config: dict[str, Any] = {
        "handler": handler.handle,
        "concurrency_modifier": handler.concurrency,
        "refresh_worker": settings.refresh_worker,
    }
    runpod.serverless.start(config)
    try:  # the SDK's loop is gone: close the engine's sessions on a short-lived loop of our own
        asyncio.run(asyncio.wait_for(handler.dispatcher.close(), 15))
    except Exception as exc:  # noqa: BLE001 - only tidiness at exit
        log.debug("closing the job engine after the worker loop: %s", exc)
    failed = supervisor.status().state is State.FAILED or handler.failed.is_set()
    log.info("RunPod worker loop ended%s; stopping ComfyUI", " (ComfyUI failed)" if failed else "")
    supervisor.begin_shutdown()
    supervisor.stop()
    return EXIT_FAILED if failed else EXIT_OK
