"""Each STANDIN_* fault-injection knob, observed from outside like a supervisor would: exit codes,
signals, silence, execution_error payloads, timings, the grandchild, the request log."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.standin import StandIn, start_standin

pytestmark = pytest.mark.timeout(60)

PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
          "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
          "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "f"}}}


def _answers(sd: StandIn, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(sd.url + "/system_stats", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


async def _submit_and_collect(sd: StandIn, prompt: dict = PROMPT, until_closed: bool = False) -> list[dict]:
    """Run a prompt over the websocket; stop at its end signal (or when the socket dies)."""
    out: list[dict] = []
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{sd.url}/ws?clientId=f") as ws:
        async with s.post(sd.url + "/prompt", json={"prompt": prompt, "client_id": "f"}) as r:
            pid = (await r.json())["prompt_id"]
        while True:
            try:
                msg = await ws.receive(timeout=10)
            except asyncio.TimeoutError:
                out.append({"type": "<timeout>"})
                return out
            if msg.type != aiohttp.WSMsgType.TEXT:
                out.append({"type": f"<{msg.type.name}>"})
                return out
            data = msg.json()
            out.append(data)
            if data["type"] == "executing" and data["data"]["node"] is None and data["data"]["prompt_id"] == pid:
                return out


def test_start_delay(tmp_path: Path) -> None:
    sd = start_standin(tmp_path, env={"STANDIN_START_DELAY_S": "1.2"}, wait=False)
    try:
        took = sd.wait_ready(timeout=10)
        assert 1.2 <= took < 4
    finally:
        sd.stop()


@pytest.mark.parametrize("spec, code", [("exit:3", 3), ("exit", 1)])
def test_start_fault_exit(tmp_path: Path, spec: str, code: int) -> None:
    sd = start_standin(tmp_path, env={"STANDIN_START_FAULT": spec}, wait=False)
    assert sd.proc.wait(timeout=10) == code
    identity, rest = sd.log_text().split("\n", 1)
    assert identity.startswith("[standin] this is the stand-in ComfyUI")
    assert rest.startswith("Traceback (most recent call last):") and "Error" in rest.splitlines()[-1]
    assert "serving since" not in rest


def test_start_fault_kill(tmp_path: Path) -> None:
    sd = start_standin(tmp_path, env={"STANDIN_START_FAULT": "kill"}, wait=False)
    assert sd.proc.wait(timeout=10) == -signal.SIGKILL


def test_start_fault_hang_never_serves_and_ignores_sigint(tmp_path: Path) -> None:
    sd = start_standin(tmp_path, env={"STANDIN_START_FAULT": "hang"}, wait=False)
    try:
        time.sleep(1.5)
        assert sd.proc.poll() is None and not _answers(sd, 0.3)
        os.killpg(sd.proc.pid, signal.SIGINT)
        time.sleep(0.5)
        assert sd.proc.poll() is None
        sd.proc.terminate()
        assert sd.proc.wait(timeout=5) == -signal.SIGTERM
    finally:
        sd.stop()


async def test_node_fault_exit(standin_factory) -> None:
    sd = standin_factory(env={"STANDIN_NODE_FAULT": "SaveImage:exit:5"})
    msgs = await _submit_and_collect(sd)
    assert sd.proc.wait(timeout=10) == 5
    assert msgs[-1]["type"].startswith("<")  # the socket died; no end signal
    assert [m["data"]["node"] for m in msgs if m["type"] == "executing"] == ["1", "2", "3"]


async def test_node_fault_kill_by_node_id(standin_factory) -> None:
    sd = standin_factory(env={"STANDIN_NODE_FAULT": "2:kill"})
    msgs = await _submit_and_collect(sd)
    assert sd.proc.wait(timeout=10) == -signal.SIGKILL
    assert [m["data"]["node"] for m in msgs if m["type"] == "executing"] == ["1", "2"]
    assert msgs[-1]["type"] in ("<CLOSE>", "<CLOSED>", "<CLOSING>", "<ERROR>")


async def test_node_fault_hang_freezes_http_and_websocket(standin_factory) -> None:
    sd = standin_factory(env={"STANDIN_NODE_FAULT": "ImageInvert:hang"})
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{sd.url}/ws?clientId=h") as ws:
        async with s.post(sd.url + "/prompt", json={"prompt": PROMPT, "client_id": "h"}) as r:
            assert r.status == 200
        await asyncio.sleep(1.0)
        assert not await asyncio.to_thread(_answers, sd, 1.0)
        with pytest.raises(asyncio.TimeoutError):
            while True:  # whatever was queued before the freeze may arrive; then nothing
                msg = await ws.receive(timeout=1.0)
                assert msg.type == aiohttp.WSMsgType.TEXT
                assert msg.json()["type"] != "execution_success"
    assert sd.proc.poll() is None
    os.killpg(sd.proc.pid, signal.SIGINT)
    await asyncio.sleep(0.5)
    assert sd.proc.poll() is None, "a wedged server does not leave on SIGINT"


async def test_node_fault_error_with_message(standin_factory) -> None:
    sd = standin_factory(env={"STANDIN_NODE_FAULT": "ImageInvert:error:disk on fire: really"})
    msgs = await _submit_and_collect(sd)
    (err,) = [m["data"] for m in msgs if m["type"] == "execution_error"]
    assert err["exception_type"] == "Exception" and err["exception_message"] == "disk on fire: really\n"
    assert err["node_id"] == "2" and err["node_type"] == "ImageInvert" and err["executed"] == ["1"]
    assert list(err) == ["prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                         "traceback", "current_inputs", "current_outputs", "timestamp"]
    assert err["current_inputs"]["image"][0].startswith("tensor([[[[")
    assert _answers(sd)


async def test_node_fault_oom(standin_factory) -> None:
    sd = standin_factory(env={"STANDIN_NODE_FAULT": "7:error,EmptyImage:oom"})
    msgs = await _submit_and_collect(sd)
    (err,) = [m["data"] for m in msgs if m["type"] == "execution_error"]
    assert err["exception_type"] == "torch.OutOfMemoryError" and err["node_id"] == "1"
    assert re.match(r"CUDA out of memory\. Tried to allocate \d+\.\d\d MiB", err["exception_message"])
    assert err["exception_message"].endswith(
        "\nThis error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have "
        "accidentally set the batch_size to a large number.")


async def test_step_delay(standin_factory) -> None:
    sd = standin_factory(models={"checkpoints": ["m.safetensors"]}, env={"STANDIN_STEP_DELAY_S": "0.2"})
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 5, "cfg": 8, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["6", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    started = time.monotonic()
    msgs = await _submit_and_collect(sd, prompt)
    assert time.monotonic() - started >= 1.0
    assert [m["data"]["value"] for m in msgs if m["type"] == "progress"] == [1, 2, 3, 4, 5]


async def test_node_delay(standin_factory) -> None:
    sd = standin_factory(env={"STANDIN_NODE_DELAY_S": "0.3"})
    started = time.monotonic()
    msgs = await _submit_and_collect(sd)
    assert time.monotonic() - started >= 0.9
    assert any(m["type"] == "execution_success" for m in msgs)


def test_spawn_grandchild_survives_term_but_not_stop(tmp_path: Path) -> None:
    sd = start_standin(tmp_path, env={"STANDIN_SPAWN_GRANDCHILD": "1"})
    try:
        match = re.search(r"^\[standin\] grandchild pid (\d+)$", sd.log_text(), re.M)
        assert match
        pid = int(match.group(1))
        assert os.getpgid(pid) == sd.proc.pid
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        time.sleep(0.3)
        os.kill(pid, 0)  # still alive
    finally:
        sd.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_request_log(standin: StandIn) -> None:
    await _submit_and_collect(standin)
    async with aiohttp.ClientSession() as s, s.get(standin.url + "/history?max_items=1") as r:
        assert r.status == 200
    entries = standin.requests()
    assert entries[0]["method"] == "GET" and entries[0]["path"] == "/system_stats"
    assert {"method": "GET", "path": "/ws", "query": "clientId=f"} in [
        {k: e[k] for k in ("method", "path", "query")} for e in entries]
    assert {"method": "GET", "path": "/history", "query": "max_items=1"} == {
        k: entries[-1][k] for k in ("method", "path", "query")}
    assert all(set(e) == {"t", "method", "path", "query"} and isinstance(e["t"], float) for e in entries)
    assert [e["t"] for e in entries] == sorted(e["t"] for e in entries)
