"""Websocket behaviour: first message, sid generation, feature_flags negotiation (basics.json), routing per
client vs broadcast, one socket per client id, reconnect of the executing client, /api/ws."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from tests.helpers.standin import StandIn, diff_structure, load_transcript, start_standin, ws_messages

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def standin_factory(comfy_factory):
    """Every check of this module is a conformance check: it runs on the stand-in and on the real ComfyUI."""
    return comfy_factory

BASICS = load_transcript("basics")


async def _drain(ws, seconds: float = 0.3) -> list[dict]:
    out = []
    try:
        while True:
            msg = await ws.receive(timeout=seconds)
            if msg.type != aiohttp.WSMsgType.TEXT:
                return out
            out.append(msg.json())
    except asyncio.TimeoutError:
        return out


def _prompt(color: int = 0, prefix: str = "ws") -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


async def test_connect_and_feature_flags_match_recording(standin: StandIn) -> None:
    opening = [e for e in BASICS if e["kind"] in ("ws_open", "ws_sent", "ws_text")][:4]
    client_id = opening[0]["url"].split("clientId=")[1]
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{standin.url}/ws?clientId={client_id}") as ws:
        await ws.send_json(opening[1]["msg"])
        got = await _drain(ws)
        await ws.send_json(opening[1]["msg"])  # only the first text message is interpreted
        again = await _drain(ws)
    assert not diff_structure(got, [e["msg"] for e in opening[2:]], varying=frozenset())
    assert again == []


async def test_sid_is_generated_without_client_id(standin: StandIn) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/ws", "/api/ws"):
            async with s.ws_connect(standin.url + path) as ws:
                first = await ws.receive_json(timeout=5)
            assert set(first["data"]) == {"status", "sid"} and re.fullmatch(r"[0-9a-f]{32}", first["data"]["sid"])
    recorded = [m for m in ws_messages(BASICS) if "sid" in m["data"]][-1]
    assert re.fullmatch(r"[0-9a-f]{32}", recorded["data"]["sid"])


async def test_first_message_other_than_feature_flags_disables_negotiation(standin: StandIn) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{standin.url}/ws?clientId=z") as ws:
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "hello"})
        await ws.send_json({"type": "feature_flags", "data": {}})
        assert await _drain(ws) == []


async def test_per_client_routing_and_broadcasts(standin: StandIn) -> None:
    async with aiohttp.ClientSession() as s, \
            s.ws_connect(f"{standin.url}/ws?clientId=a") as a, s.ws_connect(f"{standin.url}/ws?clientId=b") as b:
        await a.receive_json(timeout=5)
        await b.receive_json(timeout=5)
        async with s.post(standin.url + "/prompt", json={"prompt": _prompt(1), "client_id": "a"}) as r:
            pid = (await r.json())["prompt_id"]
        got_a = await _drain(a, 1.0)
        got_b = await _drain(b, 0.3)
        async with s.post(standin.url + "/prompt", json={"prompt": _prompt(2)}) as r:
            anon = (await r.json())["prompt_id"]
        anon_a = await _drain(a, 1.0)
        anon_b = await _drain(b, 0.3)
    assert got_a[-1] == {"type": "executing", "data": {"node": None, "prompt_id": pid}}
    assert {m["type"] for m in got_b} == {"status"}  # B sees only the broadcast queue updates
    assert [m["data"]["status"]["exec_info"]["queue_remaining"] for m in got_b] == [1, 1, 0]
    for got in (anon_a, anon_b):  # no client_id: only status and progress_state, to everyone
        assert {m["type"] for m in got} == {"status", "progress_state"}
        assert all(m["data"]["prompt_id"] == anon for m in got if m["type"] == "progress_state")


async def test_a_new_socket_with_the_same_id_replaces_the_old_one(standin: StandIn) -> None:
    async with aiohttp.ClientSession() as s:
        old = await s.ws_connect(f"{standin.url}/ws?clientId=same")
        await old.receive_json(timeout=5)
        new = await s.ws_connect(f"{standin.url}/ws?clientId=same")
        await new.receive_json(timeout=5)
        async with s.post(standin.url + "/prompt", json={"prompt": _prompt(3), "client_id": "same"}) as r:
            pid = (await r.json())["prompt_id"]
        got_new = await _drain(new, 1.0)
        got_old = await _drain(old, 0.3)
        assert any(m["type"] == "executing" and m["data"]["node"] is None for m in got_new)
        assert got_old == [] and not old.closed  # still open, receives nothing any more
        # ComfyUI quirk: when the replaced socket closes, it unregisters the id the new socket now holds.
        await old.close()
        await asyncio.sleep(0.1)
        async with s.post(standin.url + "/prompt", json={"prompt": _prompt(4), "client_id": "same"}) as r:
            assert r.status == 200
        assert await _drain(new, 0.8) == []  # not even the status broadcasts
        await new.close()
    assert pid


async def test_reconnect_of_the_executing_client_gets_the_current_node(tmp_path, request) -> None:
    """Stand-in only: STANDIN_NODE_DELAY_S keeps node 1 running while the client reconnects."""
    sd = start_standin(tmp_path, env={"STANDIN_NODE_DELAY_S": "0.5"})
    request.addfinalizer(sd.stop)
    async with aiohttp.ClientSession() as s:
        first = await s.ws_connect(f"{sd.url}/ws?clientId=runner")
        await first.receive_json(timeout=5)
        async with s.post(sd.url + "/prompt", json={"prompt": _prompt(5), "client_id": "runner"}) as r:
            pid = (await r.json())["prompt_id"]
        while True:
            m = await first.receive_json(timeout=5)
            if m["type"] == "executing":
                break
        await first.close()
        async with s.ws_connect(f"{sd.url}/ws?clientId=runner") as again:
            hello = [await again.receive_json(timeout=5), await again.receive_json(timeout=5)]
            rest = await _drain(again, 2.0)
        async with s.ws_connect(f"{sd.url}/ws?clientId=someone-else") as other:
            await other.receive_json(timeout=5)
            assert await _drain(other, 0.2) == []
    assert hello[0]["type"] == "status" and hello[0]["data"]["sid"] == "runner"
    assert hello[1] == {"type": "executing", "data": {"node": "1"}}
    assert rest[-1] == {"type": "executing", "data": {"node": None, "prompt_id": pid}}
