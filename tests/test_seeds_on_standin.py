"""The seeds' workflows, posted straight to the stand-in ComfyUI, behave as they do on real ComfyUI.

Each test starts the stand-in (a real process, ``tests/standin/main.py`` started like ComfyUI's ``main.py``)
with model files laid out as small dummy files, opens ``/ws?clientId=…`` first, uploads the request's images
with ``POST /upload/image`` and posts ``{"prompt": graph, "client_id": …}`` to ``POST /prompt``:

(a) every valid seed workflow, with exactly the models ``models.json`` lists, runs to a saved PNG: the
    websocket ends with ``executing`` ``node: null``, ``/history`` has the image, ``/view`` serves a real PNG;
(b) with one of its model files missing it is refused with ComfyUI's exact ``value_not_in_list`` 400 body;
(c) seed 002's FaceID graph gets exactly the errors real ComfyUI gives it.

Every expected value is written out from the reference (``comfyui-protocol.md`` §3-4, the transcripts in
``comfyui-transcripts/``, ``object_info-subset.json``), never read back from the stand-in's code.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import re
import uuid
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from tests.helpers.standin import start_standin

SEEDS = Path(__file__).resolve().parent / "fixtures" / "seeds"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.timeout(120)


def load(name: str):
    return json.loads((SEEDS / name).read_text(encoding="utf-8"))


MODELS = load("models.json")
DATA_URI = re.compile(r"^data:image/[a-z]+;base64,", re.S)


# ------------------------------------------------------------------------------------------ what to post
def graph_and_images(name: str) -> tuple[dict, list[tuple[str, bytes]]]:
    """The API graph a fixture's client sends and the (name, bytes) images the worker must upload first."""
    doc = load(name)
    if name.startswith(("000_", "001_", "003_")):
        graph = copy.deepcopy(doc["input"]["workflow"])
        images = [(img["name"], base64.b64decode(DATA_URI.sub("", img["image"])))
                  for img in doc["input"].get("images", [])]
        return graph, images
    if name.startswith("002_"):
        return copy.deepcopy(doc["input"]), []
    if name == "004_request_run.json":
        deployment = load("004_deployment.json")
        graph = copy.deepcopy(deployment["workflow_api"])
        for key, value in doc["inputs"].items():
            target = deployment["inputs"][key]
            graph[target["node_id"]]["inputs"][target["input_name"]] = value
        return graph, []
    raise KeyError(name)


def save_node(graph: dict) -> str:
    (nid,) = [nid for nid, n in graph.items() if n["class_type"] == "SaveImage"]
    return nid


VALID = [
    "000_request.json",
    "000_request_raw_base64.json",
    "001_request.json",
    "001_request_images.json",
    "002_request_txt2img.json",
    "003_request.json",
    "004_request_run.json",
]
FACEID = ["002_request_faceid.json", "002_request_faceid_example.json"]


# ------------------------------------------------------------------------------------------ a ComfyUI client
class Comfy:
    """A minimal ComfyUI client: websocket first, then uploads and prompts, all over one aiohttp session."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.messages: list[dict] = []

    async def __aenter__(self) -> "Comfy":
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self.ws = await self.session.ws_connect(f"{self.url}/ws?clientId={self.client_id}")
        first = await self._receive(10)
        # protocol §4: the first message is a status carrying our own id as sid
        assert first["type"] == "status", first
        assert first["data"]["sid"] == self.client_id, first
        assert first["data"]["status"]["exec_info"]["queue_remaining"] == 0, first
        return self

    async def __aexit__(self, *exc) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()

    async def _receive(self, timeout: float) -> dict:
        assert self.ws is not None
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                self.messages.append(data)
                return data
            if msg.type == aiohttp.WSMsgType.BINARY:
                continue  # previews; none are expected without --preview-method
            raise AssertionError(f"websocket ended: {msg.type} {msg.data!r}")

    async def upload(self, name: str, data: bytes) -> dict:
        assert self.session is not None
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
        form.add_field("overwrite", "true")
        async with self.session.post(f"{self.url}/upload/image", data=form) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        assert body == {"name": name, "subfolder": "", "type": "input"}, body
        return body

    async def post_prompt(self, graph: dict) -> tuple[int, dict]:
        assert self.session is not None
        async with self.session.post(
            f"{self.url}/prompt", json={"prompt": graph, "client_id": self.client_id}
        ) as resp:
            assert resp.content_type == "application/json", resp.content_type
            return resp.status, await resp.json()

    async def wait_end(self, prompt_id: str, timeout: float = 60) -> list[dict]:
        """Messages about ``prompt_id`` up to and including ``executing`` with ``node: null``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ours: list[dict] = []
        while True:
            remaining = deadline - loop.time()
            assert remaining > 0, f"no end signal for {prompt_id}; got {[m['type'] for m in ours]}"
            msg = await self._receive(remaining)
            if msg.get("data", {}).get("prompt_id") != prompt_id:
                continue
            ours.append(msg)
            if msg["type"] == "executing" and msg["data"]["node"] is None:
                return ours

    async def get_json(self, path: str):
        assert self.session is not None
        async with self.session.get(f"{self.url}{path}") as resp:
            assert resp.status == 200, (path, resp.status)
            return await resp.json()

    async def view(self, image: dict) -> tuple[int, str, bytes]:
        assert self.session is not None
        params = {"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]}
        async with self.session.get(f"{self.url}/view", params=params) as resp:
            return resp.status, resp.content_type, await resp.read()


def started(tmp_path: Path, models: dict[str, list[str]]):
    return start_standin(tmp_path, models={k: list(v) for k, v in models.items()})


async def upload_all(comfy: Comfy, images: list[tuple[str, bytes]]) -> None:
    for name, data in images:
        await comfy.upload(name, data)


def face_jpeg() -> bytes:
    """The face image seed 002 inlines into LoadImage (the worker will upload it; here the test does)."""
    return base64.b64decode(load("002_request_faceid.json")["input"]["6"]["inputs"]["image"])


# ------------------------------------------------------------------------------------------ (a) valid workflows run
def expected_size(graph: dict) -> tuple[int, int]:
    """What real ComfyUI would decode: EmptyLatentImage's width x height, or the encoded input image's size."""
    sampler = next(n for n in graph.values() if n["class_type"] == "KSampler")
    source = graph[sampler["inputs"]["latent_image"][0]]
    if source["class_type"] == "EmptyLatentImage":
        return source["inputs"]["width"], source["inputs"]["height"]
    assert source["class_type"] == "VAEEncode"
    return 64, 64  # the fixtures' input images are 64x64


@pytest.mark.parametrize("name", VALID)
async def test_valid_seed_workflow_runs_to_a_saved_png(name, tmp_path):
    graph, images = graph_and_images(name)
    standin = started(tmp_path, MODELS[name])
    try:
        async with Comfy(standin.url) as comfy:
            await upload_all(comfy, images)
            status, body = await comfy.post_prompt(graph)
            assert status == 200, body
            assert set(body) == {"prompt_id", "number", "node_errors"}, body
            assert body["node_errors"] == {}, body
            assert isinstance(body["number"], int)
            prompt_id = body["prompt_id"]
            events = await comfy.wait_end(prompt_id)

            types = [e["type"] for e in events]
            assert types[0] == "execution_start", types
            assert types[-1] == "executing" and events[-1]["data"] == {"node": None, "prompt_id": prompt_id}
            assert "execution_error" not in types and "execution_interrupted" not in types, events
            assert types.count("execution_success") == 1, types
            assert types.index("execution_success") < len(types) - 1
            cached = [e for e in events if e["type"] == "execution_cached"]
            assert len(cached) == 1 and cached[0]["data"]["nodes"] == [], cached  # fresh server: nothing cached

            # every node runs once, after the nodes it takes inputs from
            started_nodes = [e["data"]["node"] for e in events if e["type"] == "executing" and e["data"]["node"]]
            assert sorted(started_nodes) == sorted(graph), started_nodes
            for nid, node in graph.items():
                for value in node["inputs"].values():
                    if isinstance(value, list):
                        assert started_nodes.index(value[0]) < started_nodes.index(nid), (value[0], nid)
            for e in events:
                if e["type"] == "executing" and e["data"]["node"]:
                    assert e["data"]["display_node"] == e["data"]["node"], e

            # the last progress_state has every node finished (protocol §4; a_emptyimage_saveimage.json)
            states = [e["data"] for e in events if e["type"] == "progress_state"]
            assert states, "no progress_state"
            final = states[-1]["nodes"]
            assert set(final) == set(graph), sorted(final)
            for nid, st in final.items():
                assert st["state"] == "finished", (nid, st)
                assert (st["node_id"], st["display_node_id"], st["real_node_id"], st["parent_node_id"],
                        st["prompt_id"]) == (nid, nid, nid, None, prompt_id), st

            # the sampler reports its steps (protocol §4: progress comes from nodes with a progress bar)
            (sampler_id,) = [nid for nid, n in graph.items() if n["class_type"] == "KSampler"]
            steps = graph[sampler_id]["inputs"]["steps"]
            progress = [e["data"] for e in events if e["type"] == "progress"]
            assert progress, "no progress events from the KSampler"
            assert {p["node"] for p in progress} == {sampler_id}, progress
            assert all(p["max"] == steps and 0 <= p["value"] <= steps for p in progress), progress
            assert [p["value"] for p in progress] == sorted(p["value"] for p in progress)
            assert progress[-1]["value"] == steps

            out = save_node(graph)
            prefix = graph[out]["inputs"]["filename_prefix"]
            expected_images = [{"filename": f"{prefix}_00001_.png", "subfolder": "", "type": "output"}]
            executed = [e for e in events if e["type"] == "executed"]
            assert [e["data"]["node"] for e in executed] == [out], executed
            assert executed[0]["data"]["display_node"] == out
            assert executed[0]["data"]["output"] == {"images": expected_images}, executed
            # executed comes after the output node started and before execution_success
            assert events.index(executed[0]) > next(
                i for i, e in enumerate(events) if e["type"] == "executing" and e["data"]["node"] == out)
            assert events.index(executed[0]) < types.index("execution_success")

            history = await comfy.get_json(f"/history/{prompt_id}")
            assert list(history) == [prompt_id]
            entry = history[prompt_id]
            assert list(entry) == ["prompt", "outputs", "status", "meta"], list(entry)
            assert entry["outputs"] == {out: {"images": expected_images}}, entry["outputs"]
            assert entry["meta"] == {out: {"node_id": out, "display_node": out, "parent_node": None,
                                           "real_node_id": out}}, entry["meta"]
            assert entry["status"]["status_str"] == "success"
            assert entry["status"]["completed"] is True
            assert [m[0] for m in entry["status"]["messages"]] == [
                "execution_start", "execution_cached", "execution_success"
            ]
            number, stored_id, stored_prompt, extra_data, outputs_to_execute = entry["prompt"]
            assert stored_id == prompt_id and number == body["number"]
            assert stored_prompt == graph  # as posted (extra keys such as _meta included)
            assert extra_data["client_id"] == comfy.client_id
            assert outputs_to_execute == [out]

            status, content_type, data = await comfy.view(expected_images[0])
            assert status == 200 and content_type == "image/png"
            assert data.startswith(PNG_SIGNATURE)
            img = Image.open(io.BytesIO(data))
            img.load()
            assert img.format == "PNG"
            assert img.size == expected_size(graph), img.size
            # SaveImage writes the prompt as a PNG text chunk (no --disable-metadata, no extra_pnginfo sent)
            assert json.loads(img.info["prompt"]) == graph
            assert "workflow" not in img.info
            assert (standin.output_dir / expected_images[0]["filename"]).read_bytes() == data
    finally:
        standin.stop()


# ------------------------------------------------------------------------------------------ (b) a model file missing
# input_config's second element is the input's options dict as real ComfyUI 0.3.64 declares it:
# CheckpointLoaderSimple.ckpt_name has a tooltip (observed: comfyui-protocol.md §3, c_invalid_prompts.json);
# UNETLoader/CLIPLoader/VAELoader/CLIPVisionLoader/IPAdapterModelLoader declare none (object_info-subset.json,
# observed for CLIPVisionLoader and IPAdapterModelLoader).
LOADERS = {
    "checkpoints": ("CheckpointLoaderSimple", "ckpt_name", {"tooltip": "The name of the checkpoint (model) to load."}),
    "diffusion_models": ("UNETLoader", "unet_name", {}),
    "text_encoders": ("CLIPLoader", "clip_name", {}),
    "vae": ("VAELoader", "vae_name", {}),
    "clip_vision": ("CLIPVisionLoader", "clip_name", {}),
    "ipadapter": ("IPAdapterModelLoader", "ipadapter_file", {}),
}
# VAELoader lists the vae files followed by the built-in "pixel_space" (object_info-subset.json: [["pixel_space"]]).
BUILTIN_OPTIONS = {"vae": ["pixel_space"]}

ALL_MODELS: dict[str, list[str]] = {}
for _files in MODELS.values():
    for _folder, _names in _files.items():
        ALL_MODELS[_folder] = sorted(set(ALL_MODELS.get(_folder, [])) | set(_names))

MISSING_CASES = [
    (name, folder, file)
    for name in ["000_request.json", "001_request_images.json", "002_request_txt2img.json", "003_request.json",
                 "004_request_run.json"]
    for folder, files in MODELS[name].items()
    for file in files
]

FAILED_VALIDATION = {
    "type": "prompt_outputs_failed_validation",
    "message": "Prompt outputs failed validation",
    "details": "",
    "extra_info": {},
}


def not_in_list(input_name: str, value: str, options: list[str], extra: dict) -> dict:
    return {
        "type": "value_not_in_list",
        "message": "Value not in list",
        "details": f"{input_name}: '{value}' not in {options!s}",
        "extra_info": {"input_name": input_name, "input_config": [options, extra], "received_value": value},
    }


@pytest.mark.parametrize(("name", "folder", "missing"), MISSING_CASES,
                         ids=[f"{n}-{m}" for n, _, m in MISSING_CASES])
async def test_missing_model_gives_value_not_in_list(name, folder, missing, tmp_path):
    # the machine has every seed's models except this one file (a realistic multi-seed worker)
    present = {k: [f for f in v if f != missing] for k, v in ALL_MODELS.items()}
    present = {k: v for k, v in present.items() if v}
    graph, images = graph_and_images(name)
    class_type, input_name, extra = LOADERS[folder]
    (node_id,) = [nid for nid, n in graph.items()
                  if n["class_type"] == class_type and n["inputs"].get(input_name) == missing]
    options = sorted(present.get(folder, [])) + BUILTIN_OPTIONS.get(folder, [])

    standin = started(tmp_path, present)
    try:
        async with Comfy(standin.url) as comfy:
            await upload_all(comfy, images)
            status, body = await comfy.post_prompt(graph)
            assert status == 400, body
            assert body == {
                "error": FAILED_VALIDATION,
                "node_errors": {
                    node_id: {
                        "errors": [not_in_list(input_name, missing, options, extra)],
                        "dependent_outputs": [save_node(graph)],
                        "class_type": class_type,
                    }
                },
            }
            # a refused prompt is not queued and leaves no history
            assert await comfy.get_json("/queue") == {"queue_running": [], "queue_pending": []}
            assert await comfy.get_json("/history") == {}
    finally:
        standin.stop()


# ------------------------------------------------------------------------------------------ (c) seed 002's FaceID graph
IPADAPTER_ADVANCED_ERRORS = [
    {"type": "required_input_missing", "message": "Required input is missing", "details": "weight_type",
     "extra_info": {"input_name": "weight_type"}},
    {"type": "required_input_missing", "message": "Required input is missing", "details": "start_at",
     "extra_info": {"input_name": "start_at"}},
    {"type": "required_input_missing", "message": "Required input is missing", "details": "end_at",
     "extra_info": {"input_name": "end_at"}},
    {"type": "value_not_in_list", "message": "Value not in list",
     "details": "combine_embeds: 'Average' not in ['concat', 'add', 'subtract', 'average', 'norm average']",
     "extra_info": {"input_name": "combine_embeds",
                    "input_config": [["concat", "add", "subtract", "average", "norm average"], {}],
                    "received_value": "Average"}},
]
MISSING_MODEL_ERRORS = {
    "1": ("CheckpointLoaderSimple",
          [not_in_list("ckpt_name", "lustifySDXLNSFW_ggwpV7.safetensors", [],
                       {"tooltip": "The name of the checkpoint (model) to load."})]),
    "3": ("CLIPVisionLoader",
          [not_in_list("clip_name", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", [], {})]),
    "4": ("IPAdapterModelLoader", [not_in_list("ipadapter_file", "ip-adapter-faceid_sdxl.bin", [], {})]),
}


def _key(error: dict) -> tuple[str, str]:
    return error["type"], error["details"]


def assert_node_errors(body: dict, expected: dict[str, tuple[str, list[dict]]]) -> None:
    """Field by field; the order of one node's errors is not asserted: real ComfyUI walks the class's
    inputs as a Python ``set`` (``validate_inputs``), so that order changes from one process to the next."""
    assert set(body) == {"error", "node_errors"}, body
    assert body["error"] == FAILED_VALIDATION, body["error"]
    assert set(body["node_errors"]) == set(expected), sorted(body["node_errors"])
    for node_id, (class_type, errors) in expected.items():
        got = body["node_errors"][node_id]
        assert set(got) == {"errors", "dependent_outputs", "class_type"}, got
        assert got["class_type"] == class_type
        assert got["dependent_outputs"] == ["12"]
        assert sorted(got["errors"], key=_key) == sorted(errors, key=_key), (node_id, got["errors"])


@pytest.mark.parametrize("name", FACEID)
async def test_faceid_graph_with_its_models_gets_the_ipadapter_errors(name, tmp_path):
    graph, _ = graph_and_images(name)
    standin = started(tmp_path, MODELS[name])
    try:
        async with Comfy(standin.url) as comfy:
            uploaded = await comfy.upload("face.jpg", face_jpeg())
            graph["6"]["inputs"]["image"] = uploaded["name"]
            status, body = await comfy.post_prompt(graph)
            assert status == 400, body
            assert_node_errors(body, {"5": ("IPAdapterAdvanced", IPADAPTER_ADVANCED_ERRORS)})
            assert await comfy.get_json("/history") == {}
    finally:
        standin.stop()


async def test_faceid_graph_without_models_gets_every_error(tmp_path):
    graph, _ = graph_and_images("002_request_faceid.json")
    standin = started(tmp_path, {})
    try:
        async with Comfy(standin.url) as comfy:
            uploaded = await comfy.upload("face.jpg", face_jpeg())
            graph["6"]["inputs"]["image"] = uploaded["name"]
            status, body = await comfy.post_prompt(graph)
            assert status == 400, body
            assert_node_errors(body, {**MISSING_MODEL_ERRORS, "5": ("IPAdapterAdvanced", IPADAPTER_ADVANCED_ERRORS)})
    finally:
        standin.stop()


async def test_faceid_graph_as_sent_inline_base64_is_refused_by_comfyui(tmp_path):
    """Why the worker must rewrite seed 002's LoadImage: ComfyUI takes the base64 for a missing file name."""
    graph, _ = graph_and_images("002_request_faceid.json")
    inline = graph["6"]["inputs"]["image"]
    standin = started(tmp_path, MODELS["002_request_faceid.json"])
    try:
        async with Comfy(standin.url) as comfy:
            status, body = await comfy.post_prompt(graph)
            assert status == 400, body
            assert_node_errors(body, {
                "6": ("LoadImage", [{"type": "custom_validation_failed",
                                     "message": "Custom validation failed for node",
                                     "details": f"image - Invalid image file: {inline}",
                                     "extra_info": {"input_name": "image"}}]),
                "5": ("IPAdapterAdvanced", IPADAPTER_ADVANCED_ERRORS),
            })
    finally:
        standin.stop()
