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


class Session:
    """One websocket client of ``sd``: every message it got, and the prompts it submitted."""

    def __init__(self, http: aiohttp.ClientSession, sd: StandIn) -> None:
        self.http, self.sd, self.client_id = http, sd, uuid.uuid4().hex
        self.messages: list[dict] = []

    async def listen(self) -> None:
        async with self.http.ws_connect(f"{self.sd.url}/ws?clientId={self.client_id}") as ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append(msg.json())

    async def submit(self, prompt: dict, **extra) -> str:
        body = {"prompt": prompt, "client_id": self.client_id, **extra}
        async with self.http.post(self.sd.url + "/prompt", json=body) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["prompt_id"]

    async def wait(self, predicate, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if predicate(m):
                    return m
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out; got {[m['type'] for m in self.messages]}")

    async def ended(self, prompt_id: str, timeout: float = 120) -> dict:
        """The prompt's last message: execution_success, execution_interrupted or execution_error."""
        return await self.wait(lambda m: m["type"] in ("execution_success", "execution_interrupted",
                                                       "execution_error")
                               and m["data"].get("prompt_id") == prompt_id, timeout)

    def started(self) -> list[str]:
        return [m["data"]["prompt_id"] for m in self.messages if m["type"] == "execution_start"]


async def test_interrupt_takes_effect_at_the_next_node_boundary(slow: StandIn) -> None:
    """Neither ComfyUI stops a node that is running (only sampler steps check the flag inside a node): the
    blur runs to its end and the prompt is interrupted before SaveImage. What the issue listed as the
    difference left to issue 15 is not one here; the stand-in's nodes check the flag as ComfyUI's do."""
    async with aiohttp.ClientSession() as http:
        s = Session(http, slow)
        listener = asyncio.ensure_future(s.listen())
        try:
            await asyncio.sleep(0.3)
            pid = await s.submit(heavy("interrupted"))
            await s.wait(lambda m: m["type"] == "executing" and m["data"].get("node") == "2")
            await asyncio.sleep(0.3)
            async with http.post(slow.url + "/interrupt") as r:
                assert r.status == 200
            asked = time.monotonic()
            end = await s.ended(pid)
            took = time.monotonic() - asked
        finally:
            listener.cancel()
    assert end["type"] == "execution_interrupted", end
    assert (end["data"]["node_id"], end["data"]["node_type"], end["data"]["executed"]) == \
        ("3", "SaveImage", ["1", "2"]), end
    assert took > 1.0, f"the running node stopped {took:.1f} s after /interrupt"


async def test_queue_listing_delete_and_front(slow: StandIn) -> None:
    async with aiohttp.ClientSession() as http:
        s = Session(http, slow)
        listener = asyncio.ensure_future(s.listen())
        try:
            await asyncio.sleep(0.3)
            running = await s.submit(heavy("hold"))
            await s.wait(lambda m: m["type"] == "execution_start" and m["data"]["prompt_id"] == running)
            later = await s.submit(light("later"))
            deleted = await s.submit(light("deleted"))
            first = await s.submit(light("front"), front=True)
            async with http.get(slow.url + "/queue") as r:
                queue = await r.json()
            assert [item[1] for item in queue["queue_running"]] == [running]
            assert sorted(item[1] for item in queue["queue_pending"]) == sorted([later, deleted, first])
            async with http.post(slow.url + "/queue", json={"delete": [deleted]}) as r:
                assert r.status == 200
            for pid in (running, first, later):
                assert (await s.ended(pid))["type"] == "execution_success"
            async with http.get(slow.url + "/history") as r:
                history = await r.json()
        finally:
            listener.cancel()
    assert s.started() == [running, first, later]
    assert deleted not in history and {running, first, later} <= set(history)
