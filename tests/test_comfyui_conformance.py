"""Queue and interrupt semantics on both ComfyUIs (the other conformance checks: test_standin_routes,
_execution, _uploads, _validation, _websocket and _nodes, whose ComfyUI is the ``comfy`` target too).

A node that runs for seconds holds the queue: on the stand-in STANDIN_NODE_DELAY_S, on the real ComfyUI a
heavy ImageBlur (the real one has no delay knob; the stand-in's Pillow blur is quick). On both, /interrupt
takes effect at the next node boundary or sampler step, never inside a running node.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import pytest

from tests.helpers.standin import StandIn
from tests.test_standin_queue import Client

pytestmark = pytest.mark.timeout(180)

@pytest.fixture
def slow(comfy_factory) -> StandIn:
    return comfy_factory(env={"STANDIN_NODE_DELAY_S": "3"})


def heavy(prefix: str) -> dict:
    """EmptyImage -> a wide ImageBlur (seconds of CPU on the real ComfyUI) -> SaveImage."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 8,
                                                         "color": 0x808080}},
            "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}


def light(prefix: str) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


async def ended(c: Client, prompt_id: str) -> dict:
    """The prompt's last message: execution_success, execution_interrupted or execution_error."""
    return await c.wait_for(lambda m: m["type"] in ("execution_success", "execution_interrupted", "execution_error")
                            and m["data"].get("prompt_id") == prompt_id, timeout=120)


async def test_interrupt_takes_effect_at_the_next_node_boundary(slow: StandIn) -> None:
    """Neither ComfyUI stops a node that is running (only sampler steps check the flag inside a node): the
    blur runs to its end and the prompt is interrupted before SaveImage. What the issue listed as the
    difference left to issue 15 is not one here; the stand-in's nodes check the flag as ComfyUI's do."""
    async with aiohttp.ClientSession() as http, Client(http, slow, uuid.uuid4().hex) as c:
        pid = (await c.submit(heavy("interrupted")))["prompt_id"]
        await c.wait_executing(pid, "2")
        await asyncio.sleep(0.3)
        assert await c.post("/interrupt") == 200
        asked = time.monotonic()
        end = await ended(c, pid)
        took = time.monotonic() - asked
    assert end["type"] == "execution_interrupted", end
    # ``executed`` is list(set) in ComfyUI: its order differs from process to process
    assert (end["data"]["node_id"], end["data"]["node_type"], sorted(end["data"]["executed"])) == \
        ("3", "SaveImage", ["1", "2"]), end
    assert took > 1.0, f"the running node stopped {took:.1f} s after /interrupt"


async def test_queue_listing_delete_and_front(slow: StandIn) -> None:
    async with aiohttp.ClientSession() as http, Client(http, slow, uuid.uuid4().hex) as c:
        running = (await c.submit(heavy("hold")))["prompt_id"]
        await c.wait_executing(running, "2")
        later, deleted = [(await c.submit(light(p)))["prompt_id"] for p in ("later", "deleted")]
        first = (await c.submit(light("front"), front=True))["prompt_id"]
        queue = await c.get("/queue")
        assert [item[1] for item in queue["queue_running"]] == [running]
        assert sorted(item[1] for item in queue["queue_pending"]) == sorted([later, deleted, first])
        assert await c.post("/queue", {"delete": [deleted]}) == 200
        for pid in (running, first, later):
            assert (await ended(c, pid))["type"] == "execution_success"
        history = await c.get("/history")
    started = [m["data"]["prompt_id"] for m in c.messages if m["type"] == "execution_start"]
    assert started == [running, first, later]
    assert deleted not in history and {running, first, later} <= set(history)
