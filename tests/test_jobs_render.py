"""ComfyUI's own refusals and the preflight, rendered as one line per problem (no server needed).

The 400 bodies are the ones recorded from a real ComfyUI (tests/fixtures/reference); the catalogue is the
recorded ``/object_info`` subset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.config import Settings
from supervisor.jobs.inputs import comfy_dirs
from supervisor.jobs.preflight import NodeCatalog, preflight, render_node_errors, render_prompt_error
from tests.helpers.standin import http_events, load_transcript, transcript_cases

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
CATALOG = NodeCatalog(json.loads((REFERENCE / "object_info-subset.json").read_text()))

EXPECTED = {
    "unknown_class_type": ["node 1: class_type 'NoSuchNodeXYZ' is not installed in this ComfyUI (no loaded node pack provides it)"],
    "missing_class_type": ['node 1 has no class_type (the node\'s type, e.g. "KSampler")'],
    "missing_required_input": ["node 1 (EmptyImage) input width: required input is missing"],
    "loadimage_nonexistent_file": ["node 1 (LoadImage) input image: Invalid image file: does_not_exist.png"],
    "checkpoint_nonexistent": ["node 1 (CheckpointLoaderSimple) input ckpt_name: 'nonexistent.safetensors' is not installed; installed: none"],
    "no_output_node": ["the workflow has no output node (such as SaveImage or PreviewImage), so ComfyUI has nothing to run"],
    "type_mismatch": ["node 2 (SaveImage) input images: receives LATENT from node 1 output 0 but needs IMAGE"],
    "value_below_min": ["node 1 (EmptyImage) input width: Value 0 smaller than min of 1"],
    "value_above_max": ["node 1 (EmptyImage) input color: Value 99999999 bigger than max of 16777215"],
    "invalid_int": ["node 1 (EmptyImage) input width: Failed to convert an input value to a INT value (received 'abc')"],
    "bad_link_length": ["node 2 (SaveImage) input images: Bad linked input, must be a length-2 list of [node_id, slot_index]"],
    "link_to_missing_node": ["node 2 (SaveImage): Exception when validating node: KeyError '99'"],
    # one node's problems in the order the node declares its inputs (ComfyUI's own order varies per start)
    "two_errors_in_one_node_and_two_outputs": ["node 1 (EmptyImage) input width: Value 0 smaller than min of 1",
                                               "node 1 (EmptyImage) input height: required input is missing"],
    "ipadapter_model_nonexistent": ["node 1 (IPAdapterModelLoader) input ipadapter_file: 'ip-adapter_sd15.safetensors' is not installed; installed: none"],
    "clipvision_nonexistent": ["node 7 (CheckpointLoaderSimple) input ckpt_name: 'sd15.safetensors' is not installed; installed: none",
                               "node 1 (CLIPVisionLoader) input clip_name: 'CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors' is not installed; installed: none"],
    "no_prompt_key": ["No prompt provided"],
    "prompt_is_a_list": ["the workflow has no output node (such as SaveImage or PreviewImage), so ComfyUI has nothing to run"],
}


def recorded_400s() -> dict[str, tuple[dict, dict]]:
    found = {}
    for name, events in transcript_cases(load_transcript("c_invalid_prompts")).items():
        for event in http_events(events):
            request, response = event["request"], event["response"]
            if request.get("path") == "/prompt" and response["status"] == 400:
                prompt = (request.get("json") or {}).get("prompt")
                found[name] = (prompt if isinstance(prompt, dict) else {}, response["json"])
    return found


def test_every_recorded_400_is_covered() -> None:
    assert sorted(recorded_400s()) == sorted(EXPECTED)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_recorded_400_bodies_render_one_line_per_problem(case: str) -> None:
    prompt, body = recorded_400s()[case]
    assert render_prompt_error(body, prompt, CATALOG) == EXPECTED[case]


def test_long_option_lists_come_from_the_catalogue_and_are_cut() -> None:
    names = [f"model_{i:02d}.safetensors" for i in range(30)]
    info = json.loads(json.dumps(CATALOG.info))
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] = [names, {}]
    body = {"node_errors": {"4": {"class_type": "CheckpointLoaderSimple", "dependent_outputs": ["9"], "errors": [
        {"type": "value_not_in_list", "message": "Value not in list",
         "details": "ckpt_name: 'x.safetensors' not in (list of length 30)",
         "extra_info": {"input_name": "ckpt_name", "input_config": None, "received_value": "x.safetensors"}}]}}}
    lines = render_node_errors(body["node_errors"], {"4": {"class_type": "CheckpointLoaderSimple"}}, NodeCatalog(info))
    assert lines == ["node 4 (CheckpointLoaderSimple) input ckpt_name: 'x.safetensors' is not installed; installed: "
                     + ", ".join(names[:25]) + " and 5 more"]


def test_built_in_loader_options_are_not_listed_as_installed_files() -> None:
    """VAELoader lists ``pixel_space`` (and TAESD pairs) beside the VAE files: they are choices, not files."""
    info = json.loads(json.dumps(CATALOG.info))
    info["VAELoader"] = {"input": {"required": {"vae_name": [["taesd", "pixel_space"], {}]}}, "output_node": False}
    body = {"node_errors": {"4": {"class_type": "VAELoader", "errors": [
        {"type": "value_not_in_list", "message": "Value not in list", "details": "",
         "extra_info": {"input_name": "vae_name", "received_value": "sdxl_vae.safetensors"}}]}}}
    lines = render_node_errors(body["node_errors"], {"4": {"class_type": "VAELoader"}}, NodeCatalog(info))
    assert lines == ["node 4 (VAELoader) input vae_name: 'sdxl_vae.safetensors' is not installed; installed: none "
                     "(built-in options, not files: taesd, pixel_space)"]
    info["VAELoader"]["input"]["required"]["vae_name"] = [["ae.safetensors", "pixel_space"], {}]
    lines = render_node_errors(body["node_errors"], {"4": {"class_type": "VAELoader"}}, NodeCatalog(info))
    assert lines == ["node 4 (VAELoader) input vae_name: 'sdxl_vae.safetensors' is not installed; installed: "
                     "ae.safetensors (built-in options, not files: pixel_space)"]


def test_a_wrong_non_model_option_suggests_the_right_one() -> None:
    body = {"node_errors": {"3": {"class_type": "KSampler", "errors": [
        {"type": "value_not_in_list", "message": "Value not in list", "details": "",
         "extra_info": {"input_name": "sampler_name", "received_value": "Euler"}}]}}}
    line = render_node_errors(body["node_errors"], {"3": {"class_type": "KSampler"}}, CATALOG)[0]
    assert line.startswith("node 3 (KSampler) input sampler_name: 'Euler' is not an accepted value (did you mean "
                           "'euler'?); accepted: euler, ")


def graph_with(**nodes: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v.get("inputs", {})} for k, v in nodes.items()}


def test_preflight_checks_only_what_feeds_an_output_but_warns_everywhere(tmp_path: Path) -> None:
    dirs = comfy_dirs(Settings(data_dir=tmp_path))
    (dirs.input / "sub").mkdir(parents=True)
    (dirs.input / "sub" / "present.png").write_bytes(b"x")
    graph = graph_with(**{
        "1": {"class_type": "LoadImage", "inputs": {"image": "sub/present.png [input]"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a", "quality": 5}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "unused.safetensors"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "../outside.png"}},
    })
    report = preflight(graph, CATALOG, dirs=dirs)
    assert report.problems == []  # nodes 3 and 4 feed no output: ComfyUI would not validate or run them
    assert report.warnings == ["node 2 (SaveImage) input quality: SaveImage has no such input, so ComfyUI ignores it; "
                               "it is an input of SaveAnimatedWEBP"]
    graph["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "b"}}
    report = preflight(graph, CATALOG, dirs=dirs, supplied=["a.png"])
    assert report.problems == ["node 4 (LoadImage) input image: '../outside.png' was not supplied and is not in "
                               "ComfyUI's input folder; supplied: a.png"]


def test_preflight_names_failed_node_packs_when_a_class_is_unknown() -> None:
    graph = graph_with(**{"1": {"class_type": "VHS_VideoCombine"}, "2": {"class_type": "PreviewImage"}})
    report = preflight(graph, CATALOG, import_failures=("ComfyUI-VideoHelperSuite",))
    assert report.problems == ["node 1: class_type 'VHS_VideoCombine' is not installed in this ComfyUI (no loaded "
                               "node pack provides it); node packs that failed to import: ComfyUI-VideoHelperSuite"]
    assert report.missing_names


def test_a_crash_quotes_the_lines_that_explain_not_the_routine_ones(tmp_path: Path) -> None:
    """After 15 jobs the last 20 lines were all ``got prompt`` / ``Prompt executed in ...``; the traceback of the
    crash was pushed out. Routine lines are left out of a crash's quoted lines."""
    import asyncio

    from supervisor.errors import ComfyUnavailableError
    from tests.helpers.jobs import supervisor_rig

    def graph(color: int, blur: bool = False) -> dict:
        g = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "r"}}}
        if blur:
            g["3"] = {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}}
            g["2"]["inputs"]["images"] = ["3", 0]
        return g

    async def scenario(rig) -> ComfyUnavailableError:
        engine = rig.engine()
        try:
            for n in range(15):
                await engine.run_job(f"routine-{n}", {"workflow": graph(n)})
            with pytest.raises(ComfyUnavailableError) as info:
                await engine.run_job("crash", {"workflow": graph(99, blur=True)})
            return info.value
        finally:
            await engine.close()

    with supervisor_rig(tmp_path, STANDIN_NODE_FAULT="ImageBlur:exit:3") as rig:
        err = asyncio.run(scenario(rig))
        routine = [line for line in rig.sup._ring.tail(200) if "got prompt" in line or "Prompt executed" in line]
    assert len(routine) >= 30  # they were printed
    tail = err.details["log_tail"]
    assert not [line for line in tail if "got prompt" in line or "Prompt executed" in line], tail
    assert any("RuntimeError: standin: injected exit at node 3 (ImageBlur)" in line for line in tail), tail
    assert "RuntimeError: standin: injected exit at node 3 (ImageBlur)" in err.describe()
