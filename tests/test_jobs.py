"""The job engine end to end: a real ComfySupervisor runs the stand-in ComfyUI; nothing is mocked.

One supervisor serves the whole module (its start is the slow part); each test makes its own JobEngine in
its own event loop, as a worker would.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import io
import json
from typing import Any

import aiohttp
import pytest
from PIL import Image

from supervisor.errors import JobError, OutputTooLargeError, ValidationError
from supervisor.jobs.job import JobResult
from tests.helpers.comfy_targets import ComfyTarget
from tests.helpers.jobs import (
    Rig,
    b64,
    make_bucket,
    moto_s3_server,
    png_bytes,
    seed_body,
    seed_models,
    supervisor_rig,
)

SEED_FIXTURES = ["000_request.json", "000_request_raw_base64.json", "001_request.json", "001_request_images.json",
                 "002_request_txt2img.json", "003_request.json"]
MODELS = seed_models(*SEED_FIXTURES, "002_request_faceid.json")
MODELS["checkpoints"] += ["a.safetensors", "b.safetensors"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    with supervisor_rig(tmp_path_factory.mktemp("jobs"), models=MODELS) as r:
        yield r


@pytest.fixture(scope="module")
def comfy_rig(comfy: ComfyTarget, tmp_path_factory: pytest.TempPathFactory) -> Rig:
    """The same models (as names: validation is all these tests need) on the ``comfy`` target: the checks
    that take it hold on the stand-in and on the real ComfyUI alike."""
    with supervisor_rig(tmp_path_factory.mktemp("jobs-comfy"), models=MODELS, target=comfy) as r:
        yield r


async def run(rig: Rig, body: Any, job_id: str = "job", progress: Any = None, **settings: Any) -> JobResult:
    engine = rig.engine(**settings)
    try:
        return await engine.run_job(job_id, body, progress)
    finally:
        await engine.close()


async def fail(rig: Rig, body: Any, **settings: Any) -> JobError:
    with pytest.raises(JobError) as info:
        await run(rig, body, **settings)
    return info.value


def pixels(data: bytes) -> str:
    """The hash of an image's pixels (file bytes differ between jobs: SaveImage embeds the prompt)."""
    img = Image.open(io.BytesIO(data))
    return hashlib.sha256(img.mode.encode() + repr(img.size).encode() + img.tobytes()).hexdigest()


def digest(data_b64: str) -> str:
    return pixels(base64.b64decode(data_b64))


def flux(seed: int, steps: int = 2) -> dict[str, Any]:
    """Seed 001's text-to-image graph with another sampler seed."""
    graph = copy.deepcopy(seed_body("001_request.json")["input"]["workflow"])
    graph["31"]["inputs"].update(seed=seed, steps=steps)
    return graph


def faceid(image_b64: str, fixed: bool) -> dict[str, Any]:
    """Seed 002's FaceID graph with this image inline in LoadImage; ``fixed`` supplies what it lacks."""
    graph = copy.deepcopy(seed_body("002_request_faceid.json")["input"])
    graph["6"]["inputs"]["image"] = image_b64
    graph["10"]["inputs"]["steps"] = 2
    if fixed:
        graph["5"]["inputs"].update(weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="average")
    return graph


# --- the seeds ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, filename, node_id, warnings",
    [
        ("000_request.json", "ComfyUI_00001_.png", "9", []),
        ("000_request_raw_base64.json", "ComfyUI_00001_.png", "9", []),
        ("001_request.json", "ComfyUI_00001_.png", "9", []),
        ("001_request_images.json", "ComfyUI_00001_.png", "9", []),
        ("002_request_txt2img.json", "ComfyUI_00001_.png", "12", []),
        ("003_request.json", "PonyV6_00001_.png", "9", [
            "node 4 (CheckpointLoaderSimple) input stop_at_clip_layer: CheckpointLoaderSimple has no such input, so "
            "ComfyUI ignores it; it is an input of CLIPSetLastLayer"]),
    ],
)
async def test_each_valid_seed_runs_to_images(rig: Rig, fixture: str, filename: str, node_id: str,
                                               warnings: list[str]) -> None:
    result = await run(rig, seed_body(fixture)["input"], job_id=fixture[:3])
    assert [(o.filename, o.node_id, o.media_type, o.kind, o.type) for o in result.outputs] == [
        (filename, node_id, "image/png", "base64", "output")]
    out = result.outputs[0]
    data = base64.b64decode(out.data)
    assert out.size == len(data)
    assert Image.open(io.BytesIO(data)).format == "PNG"
    assert result.errors == warnings
    assert result.timings["comfy_execution_start"] <= result.timings["comfy_execution_success"]
    assert rig.job_files() == []


async def test_seed_002_inline_base64_runs_and_the_output_depends_on_the_image(rig: Rig) -> None:
    face_a, face_b = b64(png_bytes((200, 150, 120), (64, 64), "JPEG")), b64(png_bytes((20, 50, 90), (64, 64), "JPEG"))
    first = await run(rig, faceid(face_a, fixed=True))
    other = await run(rig, faceid(face_b, fixed=True))
    again = await run(rig, faceid(face_a, fixed=True))
    assert [len(r.outputs) for r in (first, other, again)] == [1, 1, 1]
    assert digest(first.outputs[0].data) == digest(again.outputs[0].data) != digest(other.outputs[0].data)
    assert first.errors == [
        "node 5 (IPAdapterAdvanced) input clip: IPAdapterAdvanced has no such input, so ComfyUI ignores it; it is "
        "an input of LoraLoader, CLIPSetLastLayer, CLIPTextEncode",
        "node 5 (IPAdapterAdvanced) input weight_faceidv2: IPAdapterAdvanced has no such input, so ComfyUI ignores "
        "it; it is an input of IPAdapterFaceID",
    ]
    assert rig.job_files() == []


async def test_seed_002_faceid_as_sent_gets_readable_errors(comfy_rig: Rig) -> None:
    err = await fail(comfy_rig, seed_body("002_request_faceid.json")["input"])
    assert isinstance(err, ValidationError)
    assert err.problems == (
        "node 5 (IPAdapterAdvanced) input weight_type: required input is missing",
        "node 5 (IPAdapterAdvanced) input combine_embeds: 'Average' is not an accepted value (did you mean "
        "'average'?); accepted: concat, add, subtract, average, norm average",
        "node 5 (IPAdapterAdvanced) input start_at: required input is missing",
        "node 5 (IPAdapterAdvanced) input end_at: required input is missing",
    )
    assert err.message.startswith("Workflow validation failed: 4 problems: node 5 (IPAdapterAdvanced) input "
                                  "weight_type: required input is missing; ")
    # which classes do have the input depends on the catalog (the real one has ~500 classes): each one named
    # must take that input
    catalog = comfy_rig.comfy_get("/object_info")
    ignored = {"clip": "node 5 (IPAdapterAdvanced) input clip: IPAdapterAdvanced has no such input, so ComfyUI "
                       "ignores it; it is an input of ",
               "weight_faceidv2": "node 5 (IPAdapterAdvanced) input weight_faceidv2: IPAdapterAdvanced has no such "
                                  "input, so ComfyUI ignores it; it is an input of "}
    assert len(err.warnings) == len(ignored)
    for warning, (name, head) in zip(err.warnings, ignored.items()):
        assert warning.startswith(head), warning
        for cls in warning[len(head):].removesuffix(" and others").split(", "):
            assert name in catalog[cls]["input"].get("required", {}) | catalog[cls]["input"].get("optional", {})
    assert err.describe().splitlines()[:2] == [
        "Workflow validation failed: 4 problems:",
        "- node 5 (IPAdapterAdvanced) input weight_type: required input is missing",
    ]
    assert comfy_rig.job_files() == []


# --- invalid prompts ---------------------------------------------------------------------------------------

EMPTY = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
SAVE = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}}
LATENT = {"class_type": "EmptyLatentImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}}


def ipadapter_graph() -> dict[str, Any]:
    return {
        "7": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"}},
        "2": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": "ip-adapter_sd15.safetensors"}},
        "3": LATENT,
        "4": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "5": {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": ["7", 0], "ipadapter": ["2", 0], "image": ["4", 0], "clip_vision": ["1", 0], "weight": 1.0,
            "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
            "embeds_scaling": "V only"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["7", 1]}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": ["8", 0], "negative": ["8", 0], "latent_image": ["3", 0], "seed": 1,
            "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "t"}},
    }


INVALID = {
    "unknown class": (
        {"workflow": {"1": {"class_type": "NoSuchNodeXYZ", "inputs": {}}, "2": SAVE}},
        ["node 1: class_type 'NoSuchNodeXYZ' is not installed in this ComfyUI (no loaded node pack provides it)"]),
    "misspelt class": (
        {"workflow": {"1": {"class_type": "EmptyImag", "inputs": {}}, "2": SAVE}},
        ["node 1: class_type 'EmptyImag' is not installed in this ComfyUI (no loaded node pack provides it); "
         "did you mean 'EmptyImage'?"]),
    "missing input (ComfyUI's 400)": (
        {"workflow": {"1": {"class_type": "EmptyImage", "inputs": {"height": 8, "batch_size": 1, "color": 0}},
                      "2": SAVE}},
        ["node 1 (EmptyImage) input width: required input is missing"]),
    "type mismatch (ComfyUI's 400)": (
        {"workflow": {"1": LATENT, "2": SAVE}},
        ["node 2 (SaveImage) input images: receives LATENT from node 1 output 0 but needs IMAGE"]),
    "missing image": (
        {"workflow": {"1": {"class_type": "LoadImage", "inputs": {"image": "does_not_exist.png"}}, "2": SAVE},
         "images": [{"name": "other.png", "image": b64(png_bytes())}]},
        ["node 1 (LoadImage) input image: 'does_not_exist.png' was not supplied and is not in ComfyUI's input "
         "folder; supplied: other.png"]),
    "missing checkpoint": (
        {"workflow": {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
                      "3": LATENT, "2": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
                      "4": {**SAVE, "inputs": {"images": ["2", 0], "filename_prefix": "t"}}}},
        ["node 1 (CheckpointLoaderSimple) input ckpt_name: 'x.safetensors' is not installed; installed: "
         "a.safetensors, b.safetensors, flux1-dev-fp8.safetensors, lustifySDXLNSFW_ggwpV7.safetensors, "
         "ponyDiffusionV6XL.safetensors"]),
    "two failing loaders": (
        {"workflow": ipadapter_graph()},
        ["node 1 (CLIPVisionLoader) input clip_name: 'CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors' is not "
         "installed; installed: CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
         "node 2 (IPAdapterModelLoader) input ipadapter_file: 'ip-adapter_sd15.safetensors' is not installed; "
         "installed: ip-adapter-faceid_sdxl.bin",
         "node 4 (LoadImage) input image: 'face.png' was not supplied and is not in ComfyUI's input folder; no "
         "images were supplied (send them as \"images\": [{\"name\", \"image\"}])"]),
    "no output node": (
        {"workflow": {"1": EMPTY}},
        ["the workflow has no output node (such as SaveImage or PreviewImage), so ComfyUI has nothing to run"]),
}


@pytest.mark.parametrize("case", list(INVALID))
async def test_invalid_prompts_get_one_clear_line_per_problem(comfy_rig: Rig, case: str) -> None:
    body, problems = INVALID[case]
    before = len(comfy_rig.requests())
    err = await fail(comfy_rig, body)
    assert isinstance(err, ValidationError)
    assert list(err.problems) == problems
    head = "Workflow validation failed: " + (f"{len(problems)} problems: " if len(problems) > 1 else "")
    assert err.message == head + "; ".join(problems)
    assert not [r for r in comfy_rig.requests()[before:] if r["path"] in ("/upload/image",)]
    assert comfy_rig.job_files() == []


# --- isolation ---------------------------------------------------------------------------------------------


async def test_jobs_back_to_back_and_concurrently_never_see_each_others_outputs(rig: Rig) -> None:
    sequential = {seed: await run(rig, {"workflow": flux(seed)}, job_id=f"seq-{seed}") for seed in (11, 12, 13)}
    hashes = {seed: [digest(o.data) for o in r.outputs] for seed, r in sequential.items()}
    assert all(len(h) == 1 for h in hashes.values())
    assert len({h[0] for h in hashes.values()}) == 3
    concurrent = await asyncio.gather(*(run(rig, {"workflow": flux(seed)}, job_id=f"par-{seed}")
                                        for seed in (13, 11, 12)))
    assert [[digest(o.data) for o in r.outputs] for r in concurrent] == [hashes[13], hashes[11], hashes[12]]
    assert rig.job_files() == []


async def test_identical_resubmission_still_returns_its_image(rig: Rig) -> None:
    body = {"workflow": flux(21)}
    first = await run(rig, body)
    second = await run(rig, body)
    assert len(first.outputs) == len(second.outputs) == 1
    assert digest(first.outputs[0].data) == digest(second.outputs[0].data)
    assert first.outputs[0].filename == second.outputs[0].filename == "ComfyUI_00001_.png"
    assert rig.job_files() == []


async def test_batch_outputs_come_in_node_then_batch_order(comfy_rig: Rig) -> None:
    graph = {"1": {**EMPTY, "inputs": {**EMPTY["inputs"], "batch_size": 3, "color": 255}},
             "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
             "5": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "second"}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "first"}}}
    result = await run(comfy_rig, {"workflow": graph})
    assert [(o.node_id, o.filename) for o in result.outputs] == [
        ("5", "second_00001_.png"), ("5", "second_00002_.png"), ("5", "second_00003_.png"),
        ("3", "first_00001_.png"), ("3", "first_00002_.png"), ("3", "first_00003_.png")]


async def test_previews_only_with_include_temp_and_always_cleaned(rig: Rig) -> None:
    graph = {"1": EMPTY, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}, "3": SAVE}
    plain = await run(rig, {"workflow": graph})
    assert [(o.node_id, o.type) for o in plain.outputs] == [("3", "output")]
    graph["1"] = {**EMPTY, "inputs": {**EMPTY["inputs"], "color": 77}}
    with_temp = await run(rig, {"workflow": graph, "include_temp": True})
    assert [(o.node_id, o.type, o.media_type) for o in with_temp.outputs] == [
        ("2", "temp", "image/png"), ("3", "output", "image/png")]
    assert with_temp.outputs[0].filename.startswith("ComfyUI_temp_")
    assert rig.job_files() == []


# --- options and results -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, ext, media, pil", [("jpeg", ".jpg", "image/jpeg", "JPEG"),
                                                   ("webp", ".webp", "image/webp", "WEBP")])
async def test_image_format_reencodes_still_images(rig: Rig, fmt: str, ext: str, media: str, pil: str) -> None:
    result = await run(rig, {"workflow": flux(31), "image_format": fmt, "image_quality": 50})
    out = result.outputs[0]
    assert (out.filename, out.media_type) == ("ComfyUI_00001_" + ext, media)
    assert Image.open(io.BytesIO(base64.b64decode(out.data))).format == pil


async def test_progress_reaches_the_callback_with_node_step_and_max(rig: Rig) -> None:
    events: list[dict[str, Any]] = []
    result = await run(rig, {"workflow": flux(41, steps=5)}, progress=events.append)
    assert result.outputs
    assert events[0]["stage"] == "queued"
    steps = [(e["node"], e["node_type"], e["step"], e["max"]) for e in events if "step" in e]
    assert steps == [("31", "KSampler", n, 5) for n in range(1, 6)]


async def test_progress_is_throttled(rig: Rig) -> None:
    events: list[dict[str, Any]] = []

    async def slow_consumer(event: dict[str, Any]) -> None:
        events.append(event)

    await run(rig, {"workflow": flux(42, steps=30)}, progress=slow_consumer, progress_interval_s=60)
    assert [e["stage"] for e in events] == ["queued", "running"]  # the forced ones; everything else throttled


async def test_output_too_large_without_a_bucket(rig: Rig) -> None:
    err = await fail(rig, {"workflow": flux(51)}, max_output_bytes=4000)
    assert isinstance(err, OutputTooLargeError)
    assert err.kind == "output_too_large"
    assert err.message.startswith("Output too large: about ")
    assert err.message.endswith(
        "as base64, over the 0.0 MB limit (MAX_OUTPUT_BYTES); configure a bucket (BUCKET_ENDPOINT_URL, "
        "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY) to receive URLs instead, or choose image_format jpeg or webp")
    assert rig.job_files() == []


async def test_keep_outputs_keeps_the_job_folders(rig: Rig) -> None:
    result = await run(rig, {"workflow": {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
                                          "2": SAVE}, "images": [{"name": "in.png", "image": b64(png_bytes())}]},
                       job_id="kept", keep_outputs=True)
    kept = rig.job_files()
    try:
        assert [p.name for p in kept] == ["in.png", result.outputs[0].filename]
        assert all(p.parent.name.startswith("job-kept-") for p in kept)
    finally:
        for p in kept:
            p.unlink()
            p.parent.rmdir()


async def test_outputs_go_to_the_bucket_as_presigned_urls(rig: Rig) -> None:
    reference = await run(rig, {"workflow": flux(61)})
    with moto_s3_server() as endpoint:
        make_bucket(endpoint, "outputs")
        result = await run(rig, {"workflow": flux(61)}, job_id="s3job", bucket_endpoint_url=endpoint + "/outputs",
                           bucket_access_key_id="AKID", bucket_secret_access_key="secret", bucket_prefix="runs")
        out = result.outputs[0]
        assert (out.kind, out.filename, out.node_id, out.media_type) == ("s3_url", "ComfyUI_00001_.png", "9",
                                                                         "image/png")
        assert out.data.startswith(f"{endpoint}/outputs/runs/s3job/ComfyUI_00001_.png?")
        async with aiohttp.ClientSession() as session, session.get(out.data) as resp:
            assert resp.status == 200
            body = await resp.read()
    assert pixels(body) == digest(reference.outputs[0].data)
    assert out.size == len(body)
    assert body.startswith(b"\x89PNG") and b"job-s3job-" in body  # the very file this job wrote
    assert rig.job_files() == []


async def test_result_serialises_to_json(rig: Rig) -> None:
    result = await run(rig, seed_body("003_request.json")["input"])
    text = json.dumps(result.to_dict())
    assert json.loads(text)["outputs"][0]["filename"] == "PonyV6_00001_.png"
    assert len(text) < rig.settings.max_output_bytes


async def test_object_info_is_fetched_once_and_again_when_a_name_is_missing(rig: Rig) -> None:
    engine = rig.engine()
    before = len(rig.requests())
    try:
        await engine.run_job("a", {"workflow": flux(71)})
        await engine.run_job("b", {"workflow": flux(72)})
        assert [r["path"] for r in rig.requests()[before:]].count("/object_info") == 1
        missing = flux(73)
        missing["30"]["inputs"]["ckpt_name"] = "later.safetensors"
        with pytest.raises(ValidationError):
            await engine.run_job("c", {"workflow": missing})
        assert [r["path"] for r in rig.requests()[before:]].count("/object_info") == 2  # refreshed once
        from tests.helpers.standin import write_model_file
        write_model_file(rig.root / "models" / "checkpoints" / "later.safetensors")
        try:
            result = await engine.run_job("d", {"workflow": missing})  # installed since: found after a refresh
        finally:
            (rig.root / "models" / "checkpoints" / "later.safetensors").unlink()
        assert len(result.outputs) == 1
    finally:
        await engine.close()
