"""Model-free nodes really execute (Pillow): sizes, crops, masks, blends, animated outputs; loaders fail at
run time like ComfyUI when a file vanished after validation; cache policies --cache-none / --cache-lru."""

from __future__ import annotations

import aiohttp
import pytest
from PIL import Image

from tests.helpers.standin import StandIn, start_standin

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def standin_factory(comfy_factory):
    """Every check of this module is a conformance check: it runs on the stand-in and on the real ComfyUI."""
    return comfy_factory


async def run(sd: StandIn, prompt: dict) -> list[dict]:
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{sd.url}/ws?clientId=n") as ws:
        async with s.post(sd.url + "/prompt", json={"prompt": prompt, "client_id": "n"}) as r:
            body = await r.json()
            assert r.status == 200, body
        out = []
        while True:
            msg = await ws.receive_json(timeout=10)
            if msg["data"].get("prompt_id") == body["prompt_id"]:
                out.append(msg)
            if msg["type"] == "executing" and msg["data"]["node"] is None:
                return out


def images(msgs: list[dict]) -> list[dict]:
    return [i for m in msgs if m["type"] == "executed" for i in m["data"]["output"].get("images", [])]


def empty(w: int, h: int, color: int, batch: int = 1) -> dict:
    return {"class_type": "EmptyImage", "inputs": {"width": w, "height": h, "batch_size": batch, "color": color}}


def save(src: str, prefix: str = "n") -> dict:
    return {"class_type": "SaveImage", "inputs": {"images": [src, 0], "filename_prefix": prefix}}


def opened(sd: StandIn, info: dict) -> Image.Image:
    base = sd.output_dir if info["type"] == "output" else sd.temp_dir
    return Image.open(base / info["subfolder"] / info["filename"])


@pytest.mark.parametrize("width, height, crop, expected", [
    (16, 0, "disabled", (16, 8)), (0, 4, "disabled", (8, 4)), (10, 10, "center", (10, 10)), (0, 0, "disabled", (32, 16))])
async def test_image_scale(standin: StandIn, width, height, crop, expected) -> None:
    prompt = {"1": empty(32, 16, 0x102030),
              "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                           "width": width, "height": height, "crop": crop}},
              "3": save("2")}
    (info,) = images(await run(standin, prompt))
    with opened(standin, info) as img:
        assert img.size == expected and img.getpixel((0, 0)) == (0x10, 0x20, 0x30)


async def test_blur_blend_and_invert_change_pixels_as_expected(standin: StandIn) -> None:
    Image.new("RGB", (20, 20), (0, 0, 0)).save(standin.input_dir / "half.png")
    with Image.open(standin.input_dir / "half.png") as img:
        img = img.copy()
    img.paste((255, 255, 255), (10, 0, 20, 20))
    img.save(standin.input_dir / "half.png")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "half.png"}},
              "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 2.0}},
              "3": save("2", "blur"),
              "4": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["5", 0], "blend_factor": 1.0,
                                                           "blend_mode": "difference"}},
              "5": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "6": save("4", "blend")}
    out = images(await run(standin, prompt))
    with opened(standin, out[0]) as blur:
        assert 0 < blur.getpixel((9, 5))[0] < 255 and blur.getpixel((0, 5)) == (0, 0, 0)
    with opened(standin, out[1]) as blend:
        # "difference" is image1 - image2 clamped at 0 in ComfyUI: black - white = 0, white - black = 255
        assert blend.getpixel((0, 0)) == (0, 0, 0) and blend.getpixel((15, 0)) == (255, 255, 255)


async def test_load_image_mask_channels(standin: StandIn) -> None:
    Image.new("RGBA", (6, 6), (200, 10, 20, 64)).save(standin.input_dir / "m.png")
    prompt = {"1": {"class_type": "LoadImageMask", "inputs": {"image": "m.png", "channel": "alpha"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "m.png"}},
              "3": {"class_type": "ImageBlend", "inputs": {"image1": ["2", 0], "image2": ["2", 0],
                                                           "blend_factor": 0.5, "blend_mode": "normal"}},
              "4": save("3")}
    msgs = await run(standin, prompt)
    assert not [m for m in msgs if m["type"] == "execution_error"]
    prompt["1"]["inputs"]["channel"] = "purple"
    async with aiohttp.ClientSession() as s, s.post(standin.url + "/prompt", json={"prompt": {
            "1": prompt["1"], "2": prompt["2"], "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
            "4": save("3")}}) as r:
        assert r.status == 200  # LoadImageMask feeds no output: not validated


async def test_animated_outputs(standin: StandIn) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(standin.input_dir / "in.gif", save_all=True, append_images=frames[1:], duration=100)
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.gif"}},  # 3 frames -> batch of 3
              "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim",
                                                                 "fps": 5.0, "lossless": True, "quality": 80,
                                                                 "method": "fastest"}},
              "3": {"class_type": "SaveAnimatedPNG", "inputs": {"images": ["1", 0], "filename_prefix": "apng",
                                                                "fps": 5.0, "compress_level": 4}}}
    msgs = await run(standin, prompt)
    outputs = {m["data"]["node"]: m["data"]["output"] for m in msgs if m["type"] == "executed"}
    assert outputs["2"] == {"images": [{"filename": "anim_00001_.webp", "subfolder": "", "type": "output"}],
                            "animated": [True]}
    assert outputs["3"]["images"][0]["filename"] == "apng_00001_.png"
    with Image.open(standin.output_dir / "anim_00001_.webp") as img:
        assert img.n_frames == 3


async def test_loader_fails_at_run_time_when_the_file_vanished(tmp_path, request) -> None:
    """Stand-in only: the file is removed while STANDIN_NODE_DELAY_S holds the prompt (no such knob on the real)."""
    sd = start_standin(tmp_path, models={"checkpoints": ["gone.safetensors"]}, env={"STANDIN_NODE_DELAY_S": "0.5"})
    request.addfinalizer(sd.stop)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "gone.safetensors"}},
              "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
              "4": save("3")}
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{sd.url}/ws?clientId=n") as ws:
        async with s.post(sd.url + "/prompt", json={"prompt": prompt, "client_id": "n"}) as r:
            assert r.status == 200
        (sd.models_dir / "checkpoints" / "gone.safetensors").unlink()
        while True:
            msg = await ws.receive_json(timeout=10)
            if msg["type"] == "execution_error":
                break
    assert msg["data"]["exception_type"] == "FileNotFoundError"
    assert msg["data"]["exception_message"] == (
        "Model in folder 'checkpoints' with filename 'gone.safetensors' not found.\n")


@pytest.mark.parametrize("args, second_cached", [((), ["1", "2"]), (("--cache-none",), []),
                                                 (("--cache-lru", "10"), ["1", "2"])])
async def test_cache_policies(standin_factory, args, second_cached) -> None:
    sd = standin_factory(extra_args=list(args))
    a = {"1": empty(8, 8, 1), "2": save("1", "a")}
    b = {"1": empty(8, 8, 2), "2": save("1", "b")}
    cached = []
    for prompt in (a, b, a):
        msgs = await run(sd, prompt)
        cached.append(next(m["data"]["nodes"] for m in msgs if m["type"] == "execution_cached"))
    # classic keeps only the last prompt's entries: coming back to `a` after `b` recomputes it.
    expected_third = ["1", "2"] if "--cache-lru" in args else []
    assert cached == [[], [], expected_third]
    msgs = await run(sd, a)
    assert next(m["data"]["nodes"] for m in msgs if m["type"] == "execution_cached") == second_cached
