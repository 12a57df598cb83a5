"""POST /prompt validation against the reference: every body of c_invalid_prompts.json and the exact 400
bodies quoted in the protocol notes, field by field, plus the rules the notes state (coercion, counter,
partial validity, only ancestors validated, combo lists from the model folders)."""

from __future__ import annotations

import copy
import json
import re

import aiohttp
import pytest

from tests.helpers.comfy_targets import ComfyTarget, start_comfyui
from tests.helpers.standin import (REFERENCE_DIR, StandIn, diff_structure, load_transcript, replay_request,
                                   transcript_cases)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def standin_factory(comfy_factory):
    """Every check of this module is a conformance check: it runs on the stand-in and on the real ComfyUI."""
    return comfy_factory

CASES = {name: [e for e in events if e["kind"] == "http" and e["request"]["path"] == "/prompt"][0]
         for name, events in transcript_cases(load_transcript("c_invalid_prompts")).items()}

# The recorded server had run other prompts before, so the counter differs; ids are random.
VARYING = frozenset({"prompt_id", "traceback", "number"})


def normalise(body):
    """ComfyUI builds ``node_errors`` (its keys), a node's errors and ``dependent_outputs`` by iterating Python
    sets (hash order, different in every process): compare them in sorted order."""
    body = copy.deepcopy(body)
    if isinstance(body, dict):
        if body.get("node_errors"):
            body["node_errors"] = dict(sorted(body["node_errors"].items()))
        for entry in (body.get("node_errors") or {}).values():
            entry["errors"] = sorted(entry["errors"], key=lambda e: json.dumps(e, sort_keys=True))
            entry["dependent_outputs"] = sorted(entry["dependent_outputs"])
    return body


@pytest.fixture(scope="module")
def recorded_like(comfy: ComfyTarget, tmp_path_factory: pytest.TempPathFactory):
    sd = start_comfyui(comfy, tmp_path_factory.mktemp("validation"), use_extra_model_paths=False)
    yield sd
    sd.stop()


@pytest.mark.parametrize("case", sorted(CASES))
async def test_recorded_prompt_response(recorded_like: StandIn, case: str) -> None:
    event = CASES[case]
    expected = event["response"]
    async with aiohttp.ClientSession() as s:
        status, content_type, body, _ = await replay_request(s, recorded_like.url, event["request"])
    assert status == expected["status"], body
    assert content_type == expected["content_type"]
    if "json" in expected:
        problems = diff_structure(normalise(body), normalise(expected["json"]), varying=VARYING)
        assert not problems, "\n".join(problems)
        if "number" in expected["json"]:
            assert isinstance(body["number"], int)
    else:
        assert body == expected["text"]


def _doc_400_bodies() -> list[dict]:
    """The JSON block under "Exact observed 400 bodies" in the protocol notes (``//`` lines are titles)."""
    text = (REFERENCE_DIR / "comfyui-protocol.md").read_text(encoding="utf-8")
    block = text.split("Exact observed 400 bodies:", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    chunks = [c for c in re.split(r"^//.*$", block, flags=re.M) if c.strip()]
    return [json.loads(c) for c in chunks]


DOC_CASES = ["unknown_class_type", "missing_required_input", "loadimage_nonexistent_file", "checkpoint_nonexistent"]


def test_protocol_doc_quotes_four_bodies() -> None:
    assert len(_doc_400_bodies()) == len(DOC_CASES)


@pytest.mark.parametrize("index", range(len(DOC_CASES)), ids=DOC_CASES)
async def test_protocol_doc_400_body_exactly(recorded_like: StandIn, index: int) -> None:
    expected = _doc_400_bodies()[index]
    async with aiohttp.ClientSession() as s:
        async with s.post(recorded_like.url + "/prompt", json=CASES[DOC_CASES[index]]["request"]["json"]) as r:
            assert r.status == 400
            assert await r.json() == expected


def _prompt(**nodes) -> dict:
    return {"prompt": nodes}


EMPTY = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}


def _save(src: str, prefix: str = "v") -> dict:
    return {"class_type": "SaveImage", "inputs": {"images": [src, 0], "filename_prefix": prefix}}


async def _post(sd: StandIn, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(sd.url + "/prompt", json=body) as r:
        return r.status, await r.json()


def _ckpt_graph(name: str) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
            "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
            "4": _save("3")}


async def test_value_not_in_list_lists_the_model_folder_files(standin_factory) -> None:
    sd = standin_factory(models={"checkpoints": ["b.safetensors", "a.safetensors"]})
    status, body = await _post(sd, {"prompt": _ckpt_graph("nope.safetensors")})
    assert status == 400
    err = body["node_errors"]["1"]["errors"][0]
    assert err["type"] == "value_not_in_list"
    assert err["details"] == "ckpt_name: 'nope.safetensors' not in ['a.safetensors', 'b.safetensors']"
    assert err["extra_info"]["input_config"] == [["a.safetensors", "b.safetensors"],
                                                 {"tooltip": "The name of the checkpoint (model) to load."}]
    status, body = await _post(sd, {"prompt": _ckpt_graph("a.safetensors")})
    assert status == 200 and body["node_errors"] == {}


async def test_more_than_20_options_give_list_length_and_null_config(standin_factory) -> None:
    sd = standin_factory(models={"loras": [f"l{i:02}.safetensors" for i in range(21)]})
    prompt = _ckpt_graph("x.safetensors")
    prompt["5"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "zz",
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
    prompt["3"]["inputs"]["vae"] = ["1", 2]
    prompt["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "t", "clip": ["5", 1]}}
    prompt["7"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}
    prompt["8"] = {"class_type": "KSampler", "inputs": {"model": ["5", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                        "latent_image": ["2", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                        "sampler_name": "euler", "scheduler": "normal",
                                                        "denoise": 1.0}}
    prompt["3"]["inputs"]["samples"] = ["8", 0]
    status, body = await _post(sd, {"prompt": prompt})
    assert status == 400
    lora_err = body["node_errors"]["5"]["errors"][0]
    assert lora_err["details"] == "lora_name: 'zz' not in (list of length 21)"
    assert lora_err["extra_info"]["input_config"] is None
    assert body["node_errors"]["5"]["dependent_outputs"] == ["4"]


async def test_rejected_prompts_consume_numbers_and_front_number_rules(standin: StandIn) -> None:
    status, body = await _post(standin, {"prompt": {"1": {"class_type": "Nope", "inputs": {}}}})
    assert status == 400
    status, body = await _post(standin, {"client_id": "x"})  # no prompt: consumes one too
    assert status == 400 and body["error"]["type"] == "no_prompt"
    status, body = await _post(standin, _prompt(**{"1": EMPTY, "2": _save("1")}))
    assert status == 200 and body["number"] == 2
    status, body = await _post(standin, {**_prompt(**{"1": EMPTY, "2": _save("1")}), "front": True})
    assert body["number"] == -3
    status, body = await _post(standin, {**_prompt(**{"1": EMPTY, "2": _save("1")}), "number": 7, "front": True})
    assert body["number"] == 7.0 and isinstance(body["number"], float)
    status, body = await _post(standin, _prompt(**{"1": EMPTY, "2": _save("1")}))
    assert body["number"] == 4  # an explicit number does not advance the counter
    status, body = await _post(standin, {**_prompt(**{"1": EMPTY, "2": _save("1")}), "prompt_id": 123})
    assert body["prompt_id"] == "123"


async def test_values_are_coerced_and_stored_converted(standin: StandIn) -> None:
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": "8", "height": 8.0, "batch_size": 1,
                                                           "color": {"__value__": 5}}},
              "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": 12, "fps": "6",
                                                                 "lossless": "false", "quality": 80,
                                                                 "method": "default"}}}
    status, body = await _post(standin, {"prompt": prompt, "prompt_id": "coerce"})
    assert status == 200
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            async with s.get(standin.url + "/history/coerce") as r:
                hist = await r.json()
            if hist:
                break
            import asyncio
            await asyncio.sleep(0.02)
    stored = hist["coerce"]["prompt"][2]
    assert stored["1"]["inputs"] == {"width": 8, "height": 8, "batch_size": 1, "color": 5}
    assert stored["2"]["inputs"]["lossless"] is True  # bool("false")
    assert stored["2"]["inputs"]["filename_prefix"] == "12" and stored["2"]["inputs"]["fps"] == 6.0
    assert hist["coerce"]["status"]["status_str"] == "success"
    assert hist["coerce"]["outputs"]["2"]["images"][0]["filename"] == "12_00001_.webp"


async def test_only_outputs_and_their_ancestors_are_validated(standin: StandIn) -> None:
    prompt = {"1": EMPTY, "2": _save("1"),
              "9": {"class_type": "EmptyImage", "inputs": {"width": -5}}}  # broken, feeds nothing
    status, body = await _post(standin, {"prompt": prompt})
    assert status == 200 and body["node_errors"] == {}


async def test_partial_execution_targets_limit_outputs(standin: StandIn) -> None:
    prompt = {"1": EMPTY, "2": _save("1", "keep"), "3": {"class_type": "EmptyImage", "inputs": {}}, "4": _save("3")}
    status, body = await _post(standin, {"prompt": prompt, "partial_execution_targets": ["2"]})
    assert status == 200 and body["node_errors"] == {}
    status, body = await _post(standin, {"prompt": prompt, "partial_execution_targets": ["4"]})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    status, body = await _post(standin, {"prompt": prompt, "partial_execution_targets": []})
    assert status == 400 and body["error"]["type"] == "prompt_no_outputs"


async def test_custom_validation_skips_builtin_checks_and_accepts_annotated_names(standin: StandIn) -> None:
    (standin.input_dir / "sub").mkdir()
    from PIL import Image
    Image.new("RGB", (4, 4)).save(standin.input_dir / "sub" / "x.png")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "sub/x.png [input]"}}, "2": _save("1")}
    status, body = await _post(standin, {"prompt": prompt})
    assert status == 200, body  # not in the combo list (subfolder), but VALIDATE_INPUTS names `image`
    prompt["1"]["inputs"]["image"] = "sub/x.png [output]"
    status, body = await _post(standin, {"prompt": prompt})
    assert status == 400
    assert body["node_errors"]["1"]["errors"][0]["details"] == "image - Invalid image file: sub/x.png [output]"


async def test_index_out_of_range_link_is_exception_during_validation(standin: StandIn) -> None:
    status, body = await _post(standin, {"prompt": {"1": EMPTY, "2": {"class_type": "SaveImage", "inputs": {
        "images": ["1", 3], "filename_prefix": "x"}}}})
    assert status == 400
    err = body["node_errors"]["2"]["errors"][0]
    assert err["type"] == "exception_during_validation"
    assert err["extra_info"]["exception_type"] == "IndexError"
    assert body["error"]["details"] == "Exception when validating node: tuple index out of range"
