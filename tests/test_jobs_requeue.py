"""A job whose ComfyUI dies before the job started is queued again on the restarted ComfyUI, once.

Nothing of such a job ran (no ``execution_start``), so running it again is safe; the job that was running when
ComfyUI died is not retried (its node may be what killed ComfyUI).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from supervisor.errors import ComfyUnavailableError
from tests.helpers.comfy_targets import ComfyTarget
from tests.helpers.jobs import Rig, decode_png, supervisor_rig
from tests.helpers.real_comfyui import workflow
from tests.test_jobs_faults import queue_ids, run, wait_until


@pytest.fixture
def rig(tmp_path, comfy: ComfyTarget) -> Rig:
    comfy.add_models(tmp_path / "models")
    with supervisor_rig(tmp_path, target=comfy, STANDIN_STEP_DELAY_S="0.05") as r:
        yield r


async def test_a_queued_job_survives_a_crash_and_the_running_one_fails(rig: Rig, comfy: ComfyTarget) -> None:
    engine = rig.engine()
    try:
        events: list[dict] = []
        running = asyncio.ensure_future(engine.run_job("running", {"workflow": workflow(seed=1, steps=200),
                                                                   "timeout_s": 300}, events.append))
        await wait_until(lambda: any(e.get("node_type") == "KSampler" and e.get("step") for e in events), 120,
                         what="the first job to be sampling")
        queued = asyncio.ensure_future(run(engine, {"workflow": workflow(seed=2, steps=2), "timeout_s": 300},
                                           "queued"))
        await wait_until(lambda: queue_ids(rig)[1], what="the second prompt to wait in ComfyUI's queue")
        first = rig.sup.status()
        os.kill(first.pid, signal.SIGKILL)

        with pytest.raises(ComfyUnavailableError) as info:
            await running
        assert info.value.message.startswith("ComfyUI stopped while running node 5 (KSampler): ComfyUI (pid ")

        result = await asyncio.wait_for(queued, comfy.start_timeout_s + 60)
        assert [o.filename for o in result.outputs] == ["tiny_sdxl_plain_00001_.png"]
        assert decode_png(result.outputs[0].data).size == (64, 64)
        assert rig.sup.status().generation == first.generation + 1
        assert any(
            w.startswith("ComfyUI restarted before this job started (ComfyUI stopped while waiting in ComfyUI's queue")
            and w.endswith("it was queued again")
            for w in result.errors
        ), result.errors
    finally:
        await engine.close()
    assert rig.job_files() == []
