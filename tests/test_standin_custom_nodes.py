"""Custom nodes loaded the way ComfyUI loads them (broken packs logged as IMPORT FAILED, classes absent,
server still up), the IPAdapter_plus stand-in (folder registration, schemas, run-time model lookup), and
the /object_info entries of the seed workflows' classes against object_info-subset.json."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.standin import REFERENCE_DIR, STANDIN_DIR, StandIn, start_standin

pytestmark = pytest.mark.timeout(60)

SUBSET = json.loads((REFERENCE_DIR / "object_info-subset.json").read_text(encoding="utf-8"))

GOOD_PACK = '''
import folder_paths
from nodes import MAX_RESOLUTION
folder_paths.add_model_folder_path("good_models", folder_paths.get_output_directory())

class GoodText:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hi"}), "n": ("INT", {"default": 1, "max": MAX_RESOLUTION})}}
    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True
    CATEGORY = "test"
    def show(self, text, n):
        return {"ui": {"text": [text * n]}}

class EmptyImage:  # tries to replace a core class: ComfyUI ignores it
    pass

NODE_CLASS_MAPPINGS = {"GoodText": GoodText, "EmptyImage": EmptyImage}
NODE_DISPLAY_NAME_MAPPINGS = {"GoodText": "Good Text"}
'''


def _make_packs(root: Path) -> tuple[Path, Path]:
    broken = root / "BrokenPack"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("import torchvision_is_not_installed\nNODE_CLASS_MAPPINGS = {'Broken': object}\n")
    good = root / "good_nodes.py"
    good.write_text(GOOD_PACK)
    return broken, good


async def _json(session: aiohttp.ClientSession, url: str):
    async with session.get(url) as r:
        assert r.status == 200
        return await r.json()


async def test_broken_pack_is_logged_and_absent_but_server_serves(tmp_path: Path, standin_factory) -> None:
    broken, good = _make_packs(tmp_path / "packs")
    sd: StandIn = standin_factory(custom_node_dirs=[broken, good])
    installed_broken = sd.models_dir.parent / "custom_nodes" / "BrokenPack"
    installed_good = sd.models_dir.parent / "custom_nodes" / "good_nodes.py"
    log = sd.log_text()
    assert "Traceback (most recent call last):" in log
    assert (f"Cannot import {installed_broken} module for custom nodes: "
            "No module named 'torchvision_is_not_installed'") in log
    assert f"   0.0 seconds (IMPORT FAILED): {installed_broken}\n" in log
    assert f"   0.0 seconds: {installed_good}\n" in log
    assert f"   0.0 seconds: {STANDIN_DIR / 'custom_nodes' / 'ComfyUI_IPAdapter_plus'}\n" in log
    block = log.split("Import times for custom nodes:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(block) == 3
    async with aiohttp.ClientSession() as s:
        info = await _json(s, sd.url + "/object_info")
        assert "Broken" not in info and "GoodText" in info and "IPAdapterModelLoader" in info
        assert info["GoodText"]["python_module"] == "custom_nodes.good_nodes"
        assert info["GoodText"]["display_name"] == "Good Text"
        assert info["EmptyImage"]["python_module"] == "nodes"
        assert await _json(s, sd.url + "/object_info/Broken") == {}
        assert "good_models" in await _json(s, sd.url + "/models")
        async with s.ws_connect(f"{sd.url}/ws?clientId=g") as ws:
            async with s.post(sd.url + "/prompt", json={"client_id": "g", "prompt": {
                    "1": {"class_type": "GoodText", "inputs": {"text": "ab", "n": 2}}}}) as r:
                assert r.status == 200
            while True:
                msg = await ws.receive_json(timeout=10)
                if msg["type"] == "executed":
                    assert msg["data"]["output"] == {"text": ["abab"]}
                    break


async def test_disable_all_custom_nodes_and_whitelist(standin_factory) -> None:
    off = standin_factory(extra_args=["--disable-all-custom-nodes"])
    on = standin_factory(extra_args=["--disable-all-custom-nodes", "--whitelist-custom-nodes",
                                     "ComfyUI_IPAdapter_plus"])
    async with aiohttp.ClientSession() as s:
        assert await _json(s, off.url + "/object_info/IPAdapterModelLoader") == {}
        assert "IPAdapterModelLoader" in await _json(s, on.url + "/object_info/IPAdapterModelLoader")
    assert "Skipping ComfyUI_IPAdapter_plus due to disable_all_custom_nodes and whitelist_custom_nodes" in off.log_text()


async def test_ipadapter_folder_registration_follows_the_real_pack(tmp_path: Path, standin_factory) -> None:
    own = tmp_path / "ipa_models"
    yaml_without = tmp_path / "without.yaml"
    yaml_without.write_text(f"x:\n  base_path: {tmp_path}\n  checkpoints: ckpts\n")
    yaml_with = tmp_path / "with.yaml"
    yaml_with.write_text(f"x:\n  ipadapter: |\n    {own}\n    {own}2\n")
    without = standin_factory(use_extra_model_paths=False, extra_args=["--extra-model-paths-config", str(yaml_without)])
    with_ = standin_factory(use_extra_model_paths=False, extra_args=["--extra-model-paths-config", str(yaml_with)])
    async with aiohttp.ClientSession() as s:
        paths = await _json(s, without.url + "/internal/folder_paths")
        assert paths["ipadapter"] == [str(STANDIN_DIR / "models" / "ipadapter")]
        assert paths["checkpoints"][1] == str(tmp_path / "ckpts")
        assert (await _json(s, with_.url + "/internal/folder_paths"))["ipadapter"] == [str(own), f"{own}2"]
        (own / "sub").mkdir(parents=True)
        (own / "sub" / "ip-adapter_sd15.safetensors").write_bytes(b"x")
        (own / "readme.txt").write_text("not a model")
        assert await _json(s, with_.url + "/models/ipadapter") == ["sub/ip-adapter_sd15.safetensors"]


def _strip(value):
    """The subset file drops tooltips; everything else must be identical."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "tooltip"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


EXTRA_KEYS = {"name", "display_name", "description", "output_tooltips", "deprecated", "experimental", "api_node"}


@pytest.fixture(scope="module")
def no_models(tmp_path_factory: pytest.TempPathFactory):
    sd = start_standin(tmp_path_factory.mktemp("subset"))
    yield sd
    sd.stop()


@pytest.mark.parametrize("class_type", sorted(SUBSET))
async def test_object_info_entry_equals_the_subset(no_models: StandIn, class_type: str) -> None:
    async with aiohttp.ClientSession() as s:
        body = await _json(s, f"{no_models.url}/object_info/{class_type}")
    entry = body[class_type]
    assert set(entry) - set(SUBSET[class_type]) <= EXTRA_KEYS
    assert {k: v for k, v in _strip(entry).items() if k not in EXTRA_KEYS} == SUBSET[class_type]
    assert entry["name"] == class_type


async def test_combo_lists_are_filled_from_the_model_folders(standin_factory) -> None:
    sd = standin_factory(models={"checkpoints": ["b.safetensors", "a.ckpt"], "vae": ["v.safetensors"],
                                 "loras": ["l.safetensors"], "clip_vision": ["cv.safetensors"],
                                 "ipadapter": ["ip.bin"], "diffusion_models": ["u.sft"],
                                 "text_encoders": ["t.safetensors"]})
    expected = {("CheckpointLoaderSimple", "ckpt_name"): ["a.ckpt", "b.safetensors"],
                ("VAELoader", "vae_name"): ["v.safetensors", "pixel_space"],
                ("LoraLoader", "lora_name"): ["l.safetensors"],
                ("CLIPVisionLoader", "clip_name"): ["cv.safetensors"],
                ("IPAdapterModelLoader", "ipadapter_file"): ["ip.bin"],
                ("UNETLoader", "unet_name"): ["u.sft"],
                ("CLIPLoader", "clip_name"): ["t.safetensors"]}
    async with aiohttp.ClientSession() as s:
        info = await _json(s, sd.url + "/object_info")
    for (cls, name), files in expected.items():
        assert info[cls]["input"]["required"][name][0] == files, (cls, name)


def _ipadapter_graph(loader: dict) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl_base.safetensors"}},
        "2": loader,
        "3": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 255}},
        "4": {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": ["2", 0] if loader["class_type"].startswith("IPAdapterUnified") else ["1", 0],
            "ipadapter": ["2", 1] if loader["class_type"].startswith("IPAdapterUnified") else ["2", 0],
            "image": ["3", 0], "weight": 1.0, "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0,
            "end_at": 1.0, "embeds_scaling": "V only"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "p", "clip": ["1", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["5", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 3, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ipa"}},
    }


async def _run(sd: StandIn, prompt: dict) -> list[dict]:
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{sd.url}/ws?clientId=i") as ws:
        async with s.post(sd.url + "/prompt", json={"prompt": prompt, "client_id": "i"}) as r:
            body = await r.json()
            assert r.status == 200, body
        out = []
        while True:
            msg = await ws.receive_json(timeout=10)
            out.append(msg)
            if msg["type"] == "executing" and msg["data"]["node"] is None:
                return out


UNIFIED = {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": ["1", 0], "preset": "PLUS (high strength)"}}


@pytest.mark.parametrize("clip_vision, ipadapter, error", [
    ([], [], "ClipVision model not found."),
    (["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"], ["ip-adapter-plus_sd15.safetensors"],
     "IPAdapter model not found."),  # sdxl checkpoint: needs the sdxl variant
    (["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"], ["ip-adapter-plus_sdxl_vit-h.safetensors"], None),
])
async def test_unified_loader_finds_files_by_regex_at_run_time(standin_factory, clip_vision, ipadapter, error):
    sd = standin_factory(models={"checkpoints": ["sdxl_base.safetensors"], "clip_vision": clip_vision,
                                 "ipadapter": ipadapter}, env={"STANDIN_STEP_DELAY_S": "0"})
    msgs = await _run(sd, _ipadapter_graph(UNIFIED))
    errors = [m["data"] for m in msgs if m["type"] == "execution_error"]
    if error is None:
        assert not errors and any(m["type"] == "execution_success" for m in msgs)
    else:
        assert errors[0]["node_type"] == "IPAdapterUnifiedLoader"
        assert errors[0]["exception_message"] == error + "\n" and errors[0]["exception_type"] == "Exception"


async def test_model_loader_path_needs_clip_vision_and_depends_on_the_image(standin_factory) -> None:
    sd = standin_factory(models={"checkpoints": ["sdxl_base.safetensors"], "ipadapter": ["ip-adapter-faceid_sdxl.bin"],
                                 "clip_vision": ["CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"]},
                         env={"STANDIN_STEP_DELAY_S": "0"})
    loader = {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": "ip-adapter-faceid_sdxl.bin"}}
    msgs = await _run(sd, _ipadapter_graph(loader))
    (err,) = [m["data"] for m in msgs if m["type"] == "execution_error"]
    assert err["exception_message"] == "Missing CLIPVision model.\n" and err["node_id"] == "4"
    graph = _ipadapter_graph(loader)
    graph["10"] = {"class_type": "CLIPVisionLoader",
                   "inputs": {"clip_name": "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"}}
    graph["4"]["inputs"]["clip_vision"] = ["10", 0]
    first = [m for m in await _run(sd, graph) if m["type"] == "executed"]
    graph["3"]["inputs"]["color"] = 254
    second = [m for m in await _run(sd, graph) if m["type"] == "executed"]
    from PIL import Image
    pix = []
    for msgs_ in (first, second):
        name = msgs_[0]["data"]["output"]["images"][0]["filename"]
        with Image.open(sd.output_dir / name) as img:
            pix.append(img.tobytes())
    assert pix[0] != pix[1], "the reference image must influence the result"


async def test_ipadapter_save_embeds_writes_ipadpt(standin_factory) -> None:
    sd = standin_factory(models={"ipadapter": ["ip-adapter_sd15.safetensors"], "clip_vision": ["cv.safetensors"]})
    prompt = {"1": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": "ip-adapter_sd15.safetensors"}},
              "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "5": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "cv.safetensors"}},
              "3": {"class_type": "IPAdapterEncoder", "inputs": {"ipadapter": ["1", 0], "image": ["2", 0], "weight": 1.0,
                                                                 "clip_vision": ["5", 0]}},
              "4": {"class_type": "IPAdapterSaveEmbeds", "inputs": {"embeds": ["3", 0], "filename_prefix": "emb"}}}
    msgs = await _run(sd, prompt)
    assert any(m["type"] == "execution_success" for m in msgs)
    assert (sd.output_dir / "emb_00001.ipadpt").is_file()
