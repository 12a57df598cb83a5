"""The job engine on both ComfyUIs: the stand-in in ``make test``, the real ComfyUI 0.3.64 in ``make test-real``.

A real ComfySupervisor runs the target with the tiny models of tests/helpers/tiny_models.py in ``MODELS_DIR``
(real files on the real ComfyUI, the stand-in's dummy files under the same names); the worker reaches them
through the extra_model_paths.yaml it generates. What is checked is what must hold on both: the SDXL and
IPAdapter workflows give real, deterministic images and IPAdapter changes the picture, an upload reaches
LoadImage and comes back with ComfyUI's arithmetic, every model-free output kind, cancelling between sampler
steps, and a second identical job after the first one's files were cleaned.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from supervisor.jobs.job import JobResult
from tests.helpers.comfy_targets import ComfyTarget
from tests.helpers.jobs import Rig, b64, png_bytes, supervisor_rig
from tests.helpers.real_comfyui import workflow

pytestmark = pytest.mark.timeout(600)

IPADAPTER_WORKFLOWS = ["sdxl_ipadapter_advanced", "sdxl_ipadapter_unified_standard", "sdxl_ipadapter_unified_plus"]


@pytest.fixture(scope="module")
def rig(comfy: ComfyTarget, tmp_path_factory: pytest.TempPathFactory) -> Rig:
    root = tmp_path_factory.mktemp("jobs-on-comfyui")
    comfy.add_models(root / "models")
    # the stand-in's sampler takes 0.1 s a step, so a long job can be cancelled while it runs, like a real one
    with supervisor_rig(root, target=comfy, STANDIN_STEP_DELAY_S="0.1") as r:
        yield r


async def run(rig: Rig, body: Any, job_id: str = "job") -> JobResult:
    engine = rig.engine()
    try:
        return await engine.run_job(job_id, body)
    finally:
        await engine.close()


def sdxl(name: str = "sdxl_plain", seed: int = 42, steps: int = 4, prefix: str | None = None) -> dict[str, Any]:
    return workflow(name, seed, steps, prefix)


def picture(result: JobResult) -> Image.Image:
    """The job's one PNG, decoded."""
    assert [(o.media_type, o.type) for o in result.outputs] == [("image/png", "output")], result.outputs
    img = Image.open(io.BytesIO(base64.b64decode(result.outputs[0].data)))
    img.load()
    return img


def pixels(img: Image.Image) -> str:
    return hashlib.sha256(img.mode.encode() + repr(img.size).encode() + img.tobytes()).hexdigest()


def assert_a_real_picture(img: Image.Image) -> None:
    """64x64 RGB with many distinct colours: not NaN-black, not a flat fill."""
    assert (img.size, img.mode) == ((64, 64), "RGB")
    colours = img.getcolors(64 * 64) or []
    assert len(colours) > 16, f"{len(colours)} distinct colours: a black or flat image"


async def test_the_worker_maps_the_model_folders_under_models_dir(rig: Rig) -> None:
    yaml_text = (Path(rig.settings.data_dir) / "extra_model_paths.yaml").read_text()
    models_dir = Path(rig.env["MODELS_DIR"])
    for key in ("checkpoints", "clip_vision", "ipadapter"):
        assert f"{key}: {models_dir / key}" in yaml_text or f"{key}: {key}" in yaml_text, yaml_text
    assert rig.comfy_get("/models/checkpoints") == ["tiny_sdxl.ckpt"]
    assert rig.comfy_get("/models/clip_vision") == ["CLIP-ViT-H-14-laion2B-s32B-b79K.bin"]
    assert sorted(rig.comfy_get("/models/ipadapter")) == ["ip-adapter-plus_sdxl_vit-h.bin",
                                                          "ip-adapter_sdxl_vit-h.bin"]


async def test_sdxl_and_ipadapter_workflows_give_real_deterministic_images(rig: Rig) -> None:
    plain = picture(await run(rig, {"workflow": sdxl()}, "plain"))
    assert_a_real_picture(plain)
    adapted = {}
    for name in IPADAPTER_WORKFLOWS:
        adapted[name] = picture(await run(rig, {"workflow": sdxl(name)}, name))
        assert_a_real_picture(adapted[name])
        assert pixels(adapted[name]) != pixels(plain), f"{name} made the same picture as the plain workflow"
    other_seed = picture(await run(rig, {"workflow": sdxl(seed=43)}, "seed-43"))
    assert pixels(other_seed) != pixels(plain)
    # seed 42 again, computed afresh (the last prompt evicted it from ComfyUI's cache): the same pixels
    again = picture(await run(rig, {"workflow": sdxl(prefix="again")}, "again"))
    assert pixels(again) == pixels(plain)
    assert rig.job_files() == []


async def test_a_second_identical_job_after_the_first_ones_files_were_cleaned(rig: Rig) -> None:
    body = {"workflow": sdxl(seed=7)}
    first = await run(rig, body, "first")
    assert rig.job_files() == []
    second = await run(rig, body, "second")
    assert pixels(picture(first)) == pixels(picture(second))
    assert first.outputs[0].filename == second.outputs[0].filename
    assert rig.job_files() == []


async def test_an_uploaded_image_reaches_loadimage_and_comes_back_inverted(rig: Rig) -> None:
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
             "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}}}
    body = {"workflow": graph, "images": [{"name": "in.png", "image": b64(png_bytes((10, 200, 60), (8, 8)))}]}
    img = picture(await run(rig, body))
    assert img.getpixel((0, 0)) == (245, 54, 195)  # float32 in ComfyUI: 200 -> 54
    assert rig.job_files() == []


async def test_every_model_free_output_kind_comes_back(rig: Rig) -> None:
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2,
                                                          "color": 0x3366CC}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "still"}},
             "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
             "4": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim",
                                                                "fps": 4.0, "lossless": True, "quality": 80,
                                                                "method": "default"}},
             "5": {"class_type": "SaveAnimatedPNG", "inputs": {"images": ["1", 0], "filename_prefix": "apng",
                                                               "fps": 4.0, "compress_level": 4}}}
    result = await run(rig, {"workflow": graph, "include_temp": True})
    kinds = sorted((o.node_id, o.type, o.media_type) for o in result.outputs)
    assert kinds == [("2", "output", "image/png"), ("2", "output", "image/png"), ("3", "temp", "image/png"),
                     ("3", "temp", "image/png"), ("4", "output", "image/webp"), ("5", "output", "image/png")]
    for out in result.outputs:
        img = Image.open(io.BytesIO(base64.b64decode(out.data)))
        assert img.size == (16, 16) and img.convert("RGB").getpixel((0, 0)) == (0x33, 0x66, 0xCC)
    assert rig.job_files() == []


async def test_a_cancelled_job_stops_between_sampler_steps_and_the_next_one_runs(rig: Rig) -> None:
    engine = rig.engine()
    try:
        long_job = asyncio.create_task(engine.run_job("long", {"workflow": sdxl(seed=9, steps=200)}))
        deadline = time.monotonic() + 60
        while not rig.comfy_get("/queue")["queue_running"]:
            assert time.monotonic() < deadline and not long_job.done(), "the long job never started"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # well inside the sampler: 200 steps take tens of seconds on either ComfyUI
        long_job.cancel()
        cancelled_at = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await long_job
        while rig.comfy_get("/queue")["queue_running"]:
            assert time.monotonic() - cancelled_at < 10, "ComfyUI kept running the cancelled prompt"
            await asyncio.sleep(0.05)
        result = await engine.run_job("next", {"workflow": sdxl(seed=10)})
        assert_a_real_picture(picture(result))
    finally:
        await engine.close()
    assert rig.job_files() == []
