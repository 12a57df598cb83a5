"""Interrupt and queue semantics (e_interrupt_and_queue.json): targeted and global interrupts at node
boundaries and sampler steps, /queue delete and clear, GET /prompt, POST /history delete, ``front`` and
``number`` priority. Slow chains use STANDIN_NODE_DELAY_S instead of the recording's heavy blurs."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.helpers.standin import StandIn, diff_structure, load_transcript

pytestmark = pytest.mark.timeout(90)

E_EVENTS = load_transcript("e_interrupt_and_queue")


def _recorded(predicate) -> dict:
    return next(e for e in E_EVENTS if predicate(e))


def _chain(color: int, blurs: int, prefix: str = "acc_e") -> dict:
    """The recording's chain: EmptyImage -> N x ImageBlur -> ImageScale -> SaveImage (ids as recorded)."""
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 4,
                                                           "color": color}}}
    prev = "1"
    for i in range(blurs):
        node = str(10 + i)
        prompt[node] = {"class_type": "ImageBlur", "inputs": {"image": [prev, 0], "blur_radius": 31, "sigma": 10.0}}
        prev = node
    prompt["900"] = {"class_type": "ImageScale", "inputs": {"image": [prev, 0], "upscale_method": "nearest-exact",
                                                            "width": 16, "height": 16, "crop": "disabled"}}
    prompt["901"] = {"class_type": "SaveImage", "inputs": {"images": ["900", 0], "filename_prefix": prefix}}
    return prompt


class Client:
    """One websocket client id with its message log, plus HTTP helpers."""

    def __init__(self, session: aiohttp.ClientSession, sd: StandIn, client_id: str) -> None:
        self.session, self.sd, self.client_id = session, sd, client_id
        self.messages: list[dict] = []
        self.ws = None
        self._reader = None

    async def __aenter__(self) -> "Client":
        self.ws = await self.session.ws_connect(f"{self.sd.url}/ws?clientId={self.client_id}")
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        self._reader.cancel()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.messages.append(msg.json())

    async def submit(self, prompt: dict, **extra) -> dict:
        body = {"prompt": prompt, "client_id": self.client_id, **extra}
        async with self.session.post(self.sd.url + "/prompt", json=body) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def post(self, path: str, json_body=None) -> int:
        async with self.session.post(self.sd.url + path, json=json_body) as r:
            assert await r.read() == b""
            return r.status

    async def get(self, path: str):
        async with self.session.get(self.sd.url + path) as r:
            return await r.json()

    async def wait_for(self, predicate, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if predicate(m):
                    return m
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out; got {[m['type'] for m in self.messages]}")

    async def wait_after(self, start: int, predicate, timeout: float = 20.0) -> dict:
        """Like wait_for, but only messages received after index ``start`` count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages[start:]:
                if predicate(m):
                    return m
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out; got {[m['type'] for m in self.messages[start:]]}")

    async def wait_end(self, prompt_id: str) -> dict:
        return await self.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] is None
                                   and m["data"]["prompt_id"] == prompt_id)

    async def wait_executing(self, prompt_id: str, node: str) -> dict:
        return await self.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] == node
                                   and m["data"]["prompt_id"] == prompt_id)

    def of(self, prompt_id: str, kind: str | None = None) -> list[dict]:
        return [m for m in self.messages if m["data"].get("prompt_id") == prompt_id
                and (kind is None or m["type"] == kind)]


@pytest.fixture
def slow(standin_factory) -> StandIn:
    return standin_factory(env={"STANDIN_NODE_DELAY_S": "0.15"})


async def test_targeted_interrupt_delete_and_queue_listing(slow: StandIn) -> None:
    async with aiohttp.ClientSession() as s, Client(s, slow, "e26ddc7176b043bcb21cb18d1ac24256") as c:
        long1 = (await c.submit(_chain(1118481, 12)))["prompt_id"]
        long2 = (await c.submit(_chain(2236962, 12)))["prompt_id"]
        short = (await c.submit(_chain(3355443, 1)))["prompt_id"]
        await c.wait_executing(long1, "11")
        queue = await c.get("/queue")
        assert [i[1] for i in queue["queue_running"]] == [long1]
        assert sorted(i[1] for i in queue["queue_pending"]) == sorted([long2, short])
        recorded = _recorded(lambda e: e["kind"] == "http" and e["request"]["path"] == "/queue"
                             and e["response"]["json"]["queue_running"])["response"]["json"]["queue_running"][0]
        item = queue["queue_running"][0]
        assert [type(x).__name__ for x in item] == [type(x).__name__ for x in recorded]
        assert item[3] == {"client_id": c.client_id} and item[4] == ["901"]
        assert await c.get("/prompt") == {"exec_info": {"queue_remaining": 3}}

        n_before = len(c.messages)
        assert await c.post("/queue", {"delete": [long2, "unknown-id"]}) == 200
        await c.wait_after(n_before, lambda m: m["type"] == "status")
        await asyncio.sleep(0.05)
        new_status = [m for m in c.messages[n_before:] if m["type"] == "status"]
        assert [m["data"] for m in new_status] == [{"status": {"exec_info": {"queue_remaining": 2}}}]
        assert [i[1] for i in (await c.get("/queue"))["queue_pending"]] == [short]

        assert await c.post("/interrupt", {"prompt_id": short}) == 200  # pending: not running, ignored
        await asyncio.sleep(0.4)
        assert not c.of(long1, "execution_interrupted")
        assert await c.post("/interrupt", {"prompt_id": long1}) == 200
        end = await c.wait_end(long1)
        await c.wait_end(short)

    (interrupted,) = c.of(long1, "execution_interrupted")
    data = interrupted["data"]
    executing = [m["data"]["node"] for m in c.of(long1, "executing")]
    assert executing[-2] == data["node_id"] and executing[-1] is None  # the node about to start
    assert data["node_type"] == "ImageBlur" and data["executed"] == executing[:-2]
    rec = _recorded(lambda e: e["kind"] == "ws_text" and e["msg"]["type"] == "execution_interrupted")["msg"]
    assert list(interrupted) == list(rec) and list(data) == list(rec["data"])
    seq = [m["type"] for m in c.messages[c.messages.index(interrupted):c.messages.index(end) + 1]]
    assert seq == ["execution_interrupted", "status", "executing"]
    assert c.of(short, "execution_success") and not c.of(long2)

    async with aiohttp.ClientSession() as s:
        hist = await (await s.get(slow.url + f"/history/{long1}")).json()
        rec_hist = _recorded(lambda e: e["kind"] == "http" and e["request"]["path"].startswith("/history/")
                             and e["response"]["json"] and "execution_interrupted" in str(e["response"]["json"]))
        expected = next(iter(rec_hist["response"]["json"].values()))
        expected = {**expected, "prompt": hist[long1]["prompt"]}
        problems = diff_structure(hist[long1], expected, varying=frozenset(
            {"prompt_id", "timestamp", "node_id", "executed"}))
        assert not problems, problems
        assert hist[long1]["status"]["status_str"] == "error" and hist[long1]["status"]["completed"] is False
        assert await (await s.get(slow.url + f"/history/{long2}")).json() == {}


async def test_global_interrupt_and_clear(slow: StandIn) -> None:
    async with aiohttp.ClientSession() as s, Client(s, slow, "c") as c:
        running = (await c.submit(_chain(4473924, 12)))["prompt_id"]
        pending = (await c.submit(_chain(5592405, 12)))["prompt_id"]
        await c.wait_executing(running, "10")
        n_before = len(c.messages)
        assert await c.post("/queue", {"clear": True}) == 200
        await c.wait_after(n_before, lambda m: m["type"] == "status"
                           and m["data"]["status"]["exec_info"]["queue_remaining"] == 1)
        assert (await c.get("/queue"))["queue_pending"] == []
        async with s.post(slow.url + "/interrupt") as r:  # no body at all
            assert r.status == 200
        await c.wait_end(running)
        assert c.of(running, "execution_interrupted")
        await asyncio.sleep(0.3)
        assert await c.get("/queue") == {"queue_running": [], "queue_pending": []}
        assert await c.get(f"/history/{pending}") == {}


async def test_interrupt_between_prompts_is_lost(standin: StandIn) -> None:
    async with aiohttp.ClientSession() as s, Client(s, standin, "c") as c:
        assert await c.post("/interrupt", {}) == 200
        pid = (await c.submit(_chain(1, 1)))["prompt_id"]
        await c.wait_end(pid)
        assert c.of(pid, "execution_success") and not c.of(pid, "execution_interrupted")


async def test_interrupt_at_sampler_step(standin_factory) -> None:
    sd = standin_factory(models={"checkpoints": ["m.safetensors"]}, env={"STANDIN_STEP_DELAY_S": "0.05"})
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 100, "cfg": 8, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["6", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["8", 0]}},
    }
    async with aiohttp.ClientSession() as s, Client(s, sd, "c") as c:
        pid = (await c.submit(prompt))["prompt_id"]
        await c.wait_for(lambda m: m["type"] == "progress" and m["data"]["value"] == 3)
        started = time.monotonic()
        await c.post("/interrupt", {"prompt_id": pid})
        await c.wait_end(pid)
        assert time.monotonic() - started < 1.0
    (msg,) = c.of(pid, "execution_interrupted")
    assert msg["data"]["node_id"] == "3" and msg["data"]["node_type"] == "KSampler"
    assert max(m["data"]["value"] for m in c.of(pid, "progress")) < 100


async def test_front_and_number_priority(slow: StandIn) -> None:
    async with aiohttp.ClientSession() as s, Client(s, slow, "c") as c:
        blocker = (await c.submit(_chain(6710886, 4)))["prompt_id"]
        await c.wait_executing(blocker, "1")
        r7 = await c.submit(_chain(7829367, 0))
        r8 = await c.submit(_chain(8947848, 0), front=True)
        late = await c.submit(_chain(1, 0), number=-100)
        early = await c.submit(_chain(2, 0), number=-200)
        assert r8["number"] == -(r7["number"] + 1) and late["number"] == -100.0
        for p in (r7, r8, late, early):
            await c.wait_end(p["prompt_id"])
    starts = [m["data"]["prompt_id"] for m in c.messages if m["type"] == "execution_start"]
    assert starts == [blocker, early["prompt_id"], late["prompt_id"], r8["prompt_id"], r7["prompt_id"]]
    recorded = _recorded(lambda e: e.get("text") == "execution_start order for r6,r7,r8")
    assert recorded["order"] == ["r6", "r8", "r7"]


async def test_interrupted_prompt_without_client_id_is_broadcast(slow: StandIn) -> None:
    async with aiohttp.ClientSession() as s, Client(s, slow, "watcher") as w:
        async with s.post(slow.url + "/prompt", json={"prompt": _chain(9, 8)}) as r:
            pid = (await r.json())["prompt_id"]
        await w.wait_for(lambda m: m["type"] == "progress_state" and "11" in m["data"]["nodes"])
        async with s.post(slow.url + "/interrupt", json={}) as r:
            assert r.status == 200
        await w.wait_for(lambda m: m["type"] == "execution_interrupted")
        await asyncio.sleep(0.2)
    kinds = {m["type"] for m in w.messages}
    assert kinds == {"status", "progress_state", "execution_interrupted"}, kinds
    assert all(m["data"]["prompt_id"] == pid for m in w.messages if m["type"] != "status")


def test_recording_has_the_cases_these_tests_mirror() -> None:
    texts = [e.get("text", "") for e in E_EVENTS if e["kind"] == "note"]
    assert any("finished" in t and "after interrupt" in t for t in texts)


async def test_api_keys_show_in_queue_but_not_in_history(slow: StandIn) -> None:
    async with aiohttp.ClientSession() as s, Client(s, slow, "k") as c:
        pid = (await c.submit(_chain(12, 3), extra_data={"api_key_comfy_org": "secret", "auth_token_comfy_org": "t",
                                                       "extra_pnginfo": {"a": 1}}))["prompt_id"]
        await c.wait_executing(pid, "10")
        running = (await c.get("/queue"))["queue_running"][0]
        assert running[3] == {"api_key_comfy_org": "secret", "auth_token_comfy_org": "t", "extra_pnginfo": {"a": 1},
                              "client_id": "k"}
        await c.wait_end(pid)
        hist = await c.get(f"/history/{pid}")
    assert hist[pid]["prompt"][3] == {"extra_pnginfo": {"a": 1}, "client_id": "k"}
