"""Every route of the stand-in against the recorded real ComfyUI traffic (basics.json, x_edge_cases.json).

The stand-in is started with exactly the flags of the recording (no extra model paths), recorded paths
(/opt/ComfyUI, /data/...) are rewritten to this run's, and each recorded request is replayed and its
response compared structurally: status, reason, content type, and the JSON body (only ids, clocks,
memory sizes and interpreter details may differ).
"""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.helpers.comfy_targets import ComfyTarget, start_comfyui
from tests.helpers.standin import (StandIn, diff_structure, http_events, load_transcript, path_mapping,
                                   replay_request, substitute)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def standin_factory(comfy_factory):
    """Every check of this module is a conformance check: it runs on the stand-in and on the real ComfyUI."""
    return comfy_factory

BASICS = http_events(load_transcript("basics"))
EDGE = [e for e in http_events(load_transcript("x_edge_cases")) if "multipart" not in e["request"]
        and e["request"]["path"] != "/prompt" and not e["request"]["path"].startswith("/history/")
        and e["request"]["path"] != "/internal/files/output"]


@pytest.fixture(scope="module")
def recorded_like(comfy: ComfyTarget, tmp_path_factory: pytest.TempPathFactory):
    """One ComfyUI (the stand-in, or the real one in ``make test-real``) started like the recorded server
    (flags of basics.json's argv, no model paths)."""
    sd = start_comfyui(comfy, tmp_path_factory.mktemp("routes"), use_extra_model_paths=False)
    yield sd
    sd.stop()


def _event_id(event: dict) -> str:
    req = event["request"]
    return f"{req['method']} {req['path']}" + (" +Origin" if req.get("headers") else "")


def _expected_body(event: dict, sd: StandIn):
    resp = event["response"]
    if "json" in resp:
        return substitute(resp["json"], path_mapping(sd))
    return resp.get("text", "")


async def _check_exchange(session: aiohttp.ClientSession, sd: StandIn, event: dict) -> None:
    req, resp = event["request"], event["response"]
    status, content_type, body, raw = await replay_request(session, sd.url, req)
    assert status == resp["status"], (req, body)
    if "content_type" in resp and resp["status"] != 403:
        assert content_type == resp["content_type"], (req, content_type)
    if "json_summary" in resp:
        _check_object_info_summary(body, resp["json_summary"])
        return
    expected = _expected_body(event, sd)
    if isinstance(expected, str):
        assert body == expected, (req, body)
        if resp.get("content_length") is not None and resp["content_length"] == 0:
            assert raw == b""
        return
    problems = diff_structure(body, expected)
    assert not problems, f"{req['method']} {req['path']}:\n" + "\n".join(problems)


def _check_object_info_summary(body: dict, summary: dict) -> None:
    """The full catalogue: every IPAdapter class the stand-in ships is one the real server listed."""
    assert isinstance(body, dict) and body
    ipadapter_here = {k for k, v in body.items() if v["python_module"] == "custom_nodes.ComfyUI_IPAdapter_plus"}
    assert ipadapter_here, "IPAdapter_plus stand-in classes missing from /object_info"
    assert ipadapter_here <= set(summary["ipadapter_nodes"])
    for name, info in body.items():
        assert info["name"] == name
        assert {"input", "input_order", "output", "output_is_list", "output_name", "display_name", "description",
                "python_module", "category", "output_node"} <= set(info)


@pytest.mark.parametrize("event", BASICS, ids=[_event_id(e) for e in BASICS])
async def test_basics_exchange_matches_recording(recorded_like: StandIn, event: dict) -> None:
    async with aiohttp.ClientSession() as session:
        await _check_exchange(session, recorded_like, event)


@pytest.mark.parametrize("event", EDGE, ids=[_event_id(e) for e in EDGE])
async def test_edge_case_exchange_matches_recording(recorded_like: StandIn, event: dict) -> None:
    async with aiohttp.ClientSession() as session:
        await _check_exchange(session, recorded_like, event)


async def test_every_route_is_aliased_under_api_except_internal(recorded_like: StandIn) -> None:
    paths = ["/system_stats", "/queue", "/prompt", "/history", "/models", "/models/checkpoints", "/embeddings",
             "/extensions", "/features", "/object_info/EmptyImage", "/history/none", "/users", "/settings"]
    async with aiohttp.ClientSession() as s:
        for path in paths:
            async with s.get(recorded_like.url + path) as plain, s.get(recorded_like.url + "/api" + path) as api:
                assert plain.status == api.status == 200, path
                assert await plain.json() == await api.json() or path == "/system_stats", path
        for path in ["/internal/folder_paths", "/internal/files/input"]:
            async with s.get(recorded_like.url + path) as r, s.get(recorded_like.url + "/api" + path) as api:
                assert r.status == 200 and api.status == 404, path
        async with s.post(recorded_like.url + "/api/interrupt") as r:
            assert r.status == 200 and await r.read() == b""


async def test_unknown_path_is_an_empty_404(recorded_like: StandIn) -> None:
    async with aiohttp.ClientSession() as s, s.get(recorded_like.url + "/no/such/route") as r:
        assert r.status == 404 and await r.read() == b""


async def test_origin_check_only_hits_mismatching_browser_origins(recorded_like: StandIn) -> None:
    url = recorded_like.url + "/system_stats"
    host = f"127.0.0.1:{recorded_like.port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403 and await r.read() == b""
        async with s.get(url, headers={"Origin": f"http://{host}"}) as r:
            assert r.status == 200
        async with s.post(recorded_like.url + "/prompt", headers={"Origin": "http://evil.example"},
                          json={"prompt": {}}) as r:
            assert r.status == 403
        async with s.get(url) as r:
            assert r.status == 200


async def test_history_max_items_and_offset(standin: StandIn) -> None:
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    async with aiohttp.ClientSession() as s:
        ids = []
        for i in range(4):
            prompt["1"]["inputs"]["color"] = i
            async with s.post(standin.url + "/prompt", json={"prompt": prompt, "prompt_id": f"p{i}"}) as r:
                ids.append((await r.json())["prompt_id"])
        for _ in range(200):
            async with s.get(standin.url + "/history") as r:
                if len(await r.json()) == 4:
                    break
            await _sleep(0.02)
        async with s.get(standin.url + "/history") as r:
            assert list(await r.json()) == ids
        async with s.get(standin.url + "/history?max_items=2") as r:
            assert list(await r.json()) == ids[-2:]
        async with s.get(standin.url + "/history?max_items=2&offset=1") as r:
            assert list(await r.json()) == ids[1:3]
        async with s.get(standin.url + "/history?offset=3") as r:
            assert list(await r.json()) == ids[3:]
        async with s.post(standin.url + "/history", json={"delete": ["p0"]}) as r:
            assert r.status == 200 and await r.read() == b""
        async with s.get(standin.url + "/history") as r:
            assert list(await r.json()) == ids[1:]
        async with s.post(standin.url + "/history", json={"clear": True}) as r:
            assert r.status == 200
        async with s.get(standin.url + "/history") as r:
            assert await r.json() == {}


async def test_models_and_folder_paths_follow_extra_model_paths(standin_factory) -> None:
    sd = standin_factory(models={"checkpoints": ["b.safetensors", "sub/a.ckpt", "notes.txt"],
                                 "loras": ["l.safetensors"], "my_key": ["anything.xyz"]})
    async with aiohttp.ClientSession() as s:
        async with s.get(sd.url + "/models/checkpoints") as r:
            assert await r.json() == ["b.safetensors", "sub/a.ckpt"]
        async with s.get(sd.url + "/models/my_key") as r:
            assert await r.json() == ["anything.xyz"]  # unknown keys have no extension filter
        async with s.get(sd.url + "/models/no_such_folder") as r:
            assert r.status == 404
        async with s.get(sd.url + "/models") as r:
            assert "my_key" in await r.json()
        async with s.get(sd.url + "/internal/folder_paths") as r:
            paths = await r.json()
        assert paths["checkpoints"] == [str(sd.comfyui_dir / "models" / "checkpoints"),
                                        str(sd.output_dir / "checkpoints")][:1] + [
            str(sd.models_dir / "checkpoints"), str(sd.output_dir / "checkpoints")]
        assert paths["ipadapter"] == [str(sd.models_dir / "ipadapter")]
        (sd.models_dir / "loras" / "new.safetensors").write_bytes(b"x")  # listings follow the disk
        async with s.get(sd.url + "/models/loras") as r:
            assert await r.json() == ["l.safetensors", "new.safetensors"]
        async with s.get(sd.url + "/view_metadata/checkpoints?filename=b.safetensors") as r:
            assert await r.json() == {"standin": "b.safetensors"}


async def test_internal_files_lists_newest_first(standin: StandIn) -> None:
    import os
    import time
    for i, name in enumerate(["a.png", "b.png", ".hidden"]):
        path = standin.input_dir / name
        path.write_bytes(b"x")
        os.utime(path, (time.time() + i, time.time() + i))
    async with aiohttp.ClientSession() as s:
        async with s.get(standin.url + "/internal/files/input") as r:
            assert await r.json() == [".hidden", "b.png", "a.png"]
        async with s.get(standin.url + "/internal/files/bogus") as r:
            assert r.status == 400 and await r.json() == {"error": "Invalid directory type"}


async def test_settings_round_trip(standin: StandIn) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(standin.url + "/settings/Comfy.Foo", json=3) as r:
            assert r.status == 200
        async with s.get(standin.url + "/settings") as r:
            assert await r.json() == {"Comfy.Foo": 3}
        async with s.get(standin.url + "/settings/Comfy.Foo") as r:
            assert await r.json() == 3
        async with s.get(standin.url + "/users") as r:
            assert await r.json() == {"storage": "server", "migrated": True}
    assert json.loads((standin.user_dir / "default" / "comfy.settings.json").read_text()) == {"Comfy.Foo": 3}


async def test_upload_over_max_upload_size_is_413(standin_factory) -> None:
    sd = standin_factory(extra_args=["--max-upload-size", "0.01"])
    async with aiohttp.ClientSession() as s:
        async with s.get(sd.url + "/features") as r:
            assert await r.json() == {"supports_preview_metadata": True, "max_upload_size": 10485.76}
        form = aiohttp.FormData()
        form.add_field("image", b"x" * 20000, filename="big.png", content_type="image/png")
        async with s.post(sd.url + "/upload/image", data=form) as r:
            assert r.status == 413
        async with s.post(sd.url + "/prompt", data=json.dumps({"prompt": {}, "pad": "x" * 20000}),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413


async def _sleep(seconds: float) -> None:
    import asyncio
    await asyncio.sleep(seconds)

