"""A job whose deadline passes, or that is cancelled, while ComfyUI is stopped (hung but not yet declared so).

Found by the chaos soak: the job waited for the websocket's close handshake and for ComfyUI to let go of the
prompt, neither of which a stopped process ever gives, and ended ~15 s after its deadline. With the default
health probe (up to ~30 s to declare a hang) the supervisor does not rescue it either. A stopped ComfyUI does
not let go of the interrupted prompt within INTERRUPT_GRACE_S, so the job has it restarted (issue 15).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from supervisor.errors import ComfyUnavailableError, JobTimeoutError
from tests.helpers.jobs import Rig, supervisor_rig
from tests.test_jobs_faults import MODELS, flux, queue_ids, run, wait_until

GRACE_S = 2.0


@pytest.fixture
def stoppable_rig(tmp_path) -> Rig:
    """Sampler steps of 0.05 s and a slow health probe: a stopped ComfyUI stays 'ready' for the whole test."""
    with supervisor_rig(tmp_path, models=MODELS, STANDIN_STEP_DELAY_S="0.05", HEALTH_INTERVAL_S="30",
                        HEALTH_TIMEOUT_S="5", HEALTH_FAILURES="3", INTERRUPT_GRACE_S=str(GRACE_S)) as r:
        yield r


async def _stop_when_running(rig: Rig) -> int:
    await wait_until(lambda: queue_ids(rig)[0], what="the prompt to run")
    await asyncio.sleep(0.3)
    pid = rig.sup.status().pid
    os.kill(pid, signal.SIGSTOP)
    return pid


async def test_a_deadline_while_comfyui_is_stopped_ends_the_job_promptly(stoppable_rig: Rig) -> None:
    engine = stoppable_rig.engine()
    pid = None
    try:
        started = time.monotonic()
        job = asyncio.ensure_future(run(engine, {"workflow": flux(1, steps=200), "timeout_s": 2}))
        pid = await _stop_when_running(stoppable_rig)
        with pytest.raises(JobTimeoutError) as info:
            await job
        elapsed = time.monotonic() - started
        assert info.value.message.startswith(
            "Job timed out after 2 s while running node 31 (KSampler); ComfyUI did not let go of the prompt within "
            "2 s of the interrupt (INTERRUPT_GRACE_S), so it was restarted; the job ended "), info.value.message
        assert elapsed < 2 + GRACE_S + 3, elapsed  # deadline + grace + the kill
        assert stoppable_rig.sup.status().last_exit.reason.startswith("restarted on request")
    finally:
        if pid:
            _resume(pid)
        await engine.close()


async def test_a_cancel_while_comfyui_is_stopped_returns_promptly(stoppable_rig: Rig) -> None:
    engine = stoppable_rig.engine()
    pid = None
    try:
        job = asyncio.ensure_future(run(engine, {"workflow": flux(2, steps=200), "timeout_s": 60}))
        pid = await _stop_when_running(stoppable_rig)
        cancelled_at = time.monotonic()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert time.monotonic() - cancelled_at < GRACE_S + 3  # the grace, then the kill
    finally:
        if pid:
            _resume(pid)
        await engine.close()


async def test_a_comfyui_that_stopped_answering_is_reported_unreachable_not_as_an_internal_error(
    stoppable_rig: Rig,
) -> None:
    """Found by the chaos soak with the default probe: the 'did it crash?' check re-raised its own TimeoutError."""
    engine = stoppable_rig.engine()
    pid = stoppable_rig.sup.status().pid
    try:
        await run(engine, {"workflow": flux(3, steps=1), "timeout_s": 30})  # warm: object_info is cached
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(ComfyUnavailableError) as info:
            await run(engine, {"workflow": flux(4, steps=1), "timeout_s": 30})
        assert info.value.kind == "comfy_unavailable"
        assert info.value.message.startswith(f"ComfyUI server ({stoppable_rig.sup.base_url[7:]}) not reachable: ")
    finally:
        os.kill(pid, signal.SIGCONT)
        await engine.close()


def _resume(pid: int) -> None:
    """SIGCONT, unless the restart has already killed it."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
