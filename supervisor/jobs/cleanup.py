"""Ending a job: taking its prompt back from ComfyUI, and removing its files once ComfyUI has let go of them.

A job that gives up (deadline, cancellation, failure) deletes its prompt from ComfyUI's queue or interrupts it,
and waits a bounded time for ComfyUI to let go. Every job then removes its input and output folders and the
reported files outside them that its prompt wrote -- at once, or, when ComfyUI still holds the prompt, in a
late cleanup once it does: removing them earlier would let the prompt's SaveImage write into a folder nobody
cleans. :meth:`Cleaner.close` bounds the late cleanups still running when the engine closes.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from supervisor.comfy.client import ComfyClient
from supervisor.comfy.status import ComfyHandle
from supervisor.config import Settings
from supervisor.errors import ComfyUnavailableError
from supervisor.jobs.inputs import ComfyDirs
from supervisor.jobs.job import Job
from supervisor.jobs.outputs import OutputRef, collect_refs

log = logging.getLogger("supervisor.jobs")

CANCEL_GRACE_S = 10.0  # how long late cleanups may still run when the engine closes
RESTART_KILL_S = 5.0  # beyond STOP_TIMEOUT_S, how long a restart's kill of ComfyUI's tree may take
ABANDON_POLL_S = 0.1
REINTERRUPT_S = 1.0  # an interrupt posted between two prompts is lost: repeat it while the prompt still runs
LATE_CLEANUP_POLL_S = 1.0


class Cleaner:
    """Gives prompts back to ComfyUI and removes jobs' files; one per engine, it owns the late cleanups.

    ``client`` returns the engine's ComfyUI client (opened on first use), so nothing is opened for a job that
    never reached ComfyUI.
    """

    def __init__(self, settings: Settings, comfy: ComfyHandle, dirs: ComfyDirs, client: Callable[[], ComfyClient]):
        self.settings = settings
        self.comfy = comfy
        self.dirs = dirs
        self.client = client
        self._background: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        """Let the late cleanups finish (bounded by CANCEL_GRACE_S), then cancel what is left."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=CANCEL_GRACE_S)
            for task in self._background:
                task.cancel()

    # --- giving the prompt back ---------------------------------------------------------------------

    async def abandon(self, job: Job) -> str | None:
        """Take the prompt back from ComfyUI: delete it if queued, interrupt it if running; wait, bounded.

        ComfyUI acts on an interrupt only between nodes or sampler steps, so a node that runs for minutes holds
        the prompt (and every job behind it) for minutes. If ComfyUI has not let go within INTERRUPT_GRACE_S,
        its process is restarted: a deadline then holds at deadline + grace + the kill, and the next job waits
        for the restart, not for the node. Returns a note for the job's message when that happened. If ComfyUI
        cannot be reached, the job still ends; its folders are removed once the prompt has left.
        """
        if not job.posted or job.ended or job.crashed is not None:
            return None
        grace = self.settings.interrupt_grace_s
        try:
            async with asyncio.timeout(grace):
                await self._take_back(job)
                return None
        except ComfyUnavailableError as exc:
            log.warning("job %s: could not take prompt %s back: ComfyUI did not answer (%s); its files are "
                        "removed once it leaves", job.job_id, job.prompt_id, exc.details.get("reason", exc.message))
            return None
        except TimeoutError:
            pass
        return await self._restart_comfy(job, grace)

    async def _restart_comfy(self, job: Job, grace: float) -> str:
        """ComfyUI kept the prompt past the grace: restart it (its queue goes with it) and wait for the kill."""
        note = (f"ComfyUI did not let go of the prompt within {grace:g} s of the interrupt (INTERRUPT_GRACE_S), "
                "so it was restarted")
        log.warning("job %s: prompt %s %s; restarting ComfyUI", job.job_id, job.prompt_id,
                    f"was still in ComfyUI {grace:g} s after the interrupt")
        try:
            async with asyncio.timeout(self.settings.stop_timeout_s + RESTART_KILL_S):
                await self.comfy.restart(job.generation, f"job {job.job_id}'s prompt did not let go of an "
                                         f"interrupt within {grace:g} s (INTERRUPT_GRACE_S)")
        except TimeoutError:
            log.error("job %s: ComfyUI (generation %d) was not gone after the restart's kill", job.job_id,
                      job.generation)
            return note
        job.ended = True  # its process, queue and prompt are gone: the files can go now
        return note

    async def _take_back(self, job: Job) -> None:
        """Poll ``/queue`` (only here, after the job gave up on the prompt) until the prompt is gone."""
        loop = asyncio.get_running_loop()
        last_interrupt = 0.0
        absent_since: float | None = None
        while True:
            state = await self.client().prompt_state(job.prompt_id)
            if state == "pending":
                await self.client().delete_queued([job.prompt_id])
            elif state == "running" and loop.time() - last_interrupt >= REINTERRUPT_S:
                await self.client().interrupt(job.prompt_id)
                last_interrupt = loop.time()
            if state != "absent":
                absent_since = None
            else:
                # a POST still in flight may queue it a moment later: make sure it stays gone
                absent_since = absent_since or loop.time()
                if job.accepted or loop.time() - absent_since > 1.0:
                    job.ended = True
                    return
            await asyncio.sleep(ABANDON_POLL_S)

    # --- removing the files -------------------------------------------------------------------------

    async def cleanup(self, job: Job) -> None:
        """Remove the job's folders now, or once ComfyUI lets go of the prompt."""
        if self.settings.keep_outputs:
            return
        if job.posted and not job.ended and job.crashed is None:
            task = asyncio.get_running_loop().create_task(self._late_cleanup(job))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        await asyncio.to_thread(remove_files, job, self.dirs)

    async def _late_cleanup(self, job: Job) -> None:
        """Wait until ComfyUI no longer holds the prompt (or that process is gone), then remove the folders.

        Removing them while the prompt still runs would let its SaveImage write into a folder nobody cleans.
        """
        loop = asyncio.get_running_loop()
        limit = loop.time() + self.settings.max_job_timeout_s
        try:
            while loop.time() < limit:
                try:
                    if await self.client().prompt_state(job.prompt_id) == "absent":
                        break
                except ComfyUnavailableError:
                    if self.comfy.status().generation != job.generation:
                        break  # that process and its queue are gone
                await asyncio.sleep(LATE_CLEANUP_POLL_S)
        finally:
            await asyncio.to_thread(remove_files, job, self.dirs)


def remove_files(job: Job, dirs: ComfyDirs) -> None:
    """Delete the job's input and output folders and the files its prompt wrote elsewhere."""
    for root in (dirs.input, dirs.output):
        shutil.rmtree(root / job.folder, ignore_errors=True)
    if not job.extra_files and job.executed:  # failed before reading outputs: what the events reported
        job.extra_files = files_to_delete(job, collect_refs(job.executed, job.request.workflow, job.cached), dirs)
    for path in job.extra_files:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            log.warning("could not delete %s", path)


def files_to_delete(job: Job, refs: list[OutputRef], dirs: ComfyDirs) -> list[Path]:
    """Reported files outside the job folder that this prompt wrote (cached ones belong to earlier jobs)."""
    paths = []
    for ref in refs:
        if ref.cached or ref.subfolder.split("/", 1)[0] == job.folder and ref.type == "output":
            continue
        path = ref.path(dirs)
        if path is not None:
            paths.append(path)
    return paths


async def shielded(coro: Awaitable[Any]) -> Any:
    """Run cleanup to its end even if the job's task is cancelled again meanwhile."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task}, timeout=CANCEL_GRACE_S + 2)
        raise
