"""Named workflows: the shipped files are valid ComfyUI graphs, requests by name expand or fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from supervisor.errors import InvalidInputError
from supervisor.jobs.request import parse_request
from supervisor.config import Settings
from supervisor.comfy.node_classes import required_classes
from supervisor.api.workflows import (WorkflowFileError, WorkflowLibrary, is_named_request, parse_workflow,
                                  prepare_input)
from tests.helpers.api import ROOT, SEEDS, seed

OBJECT_INFO = json.loads((ROOT / "tests" / "fixtures" / "reference" / "object_info-subset.json").read_text())
SHIPPED = WorkflowLibrary.load(ROOT / "workflows")
COMFY_TYPES = {"INT": "int", "FLOAT": "float", "STRING": "string", "BOOLEAN": "bool"}
FACE_B64 = seed("002_request_faceid.json")["input"]["6"]["inputs"]["image"]


def test_the_shipped_workflows_load_and_use_only_known_classes_and_inputs() -> None:
    assert SHIPPED.names() == ["sdxl_ipadapter_face", "sdxl_txt2img"] and SHIPPED.broken == {}
    for wf in SHIPPED.workflows.values():
        for node_id, node in wf.graph.items():
            spec = OBJECT_INFO[node["class_type"]]["input"]
            known = {**spec.get("required", {}), **spec.get("optional", {})}
            assert set(node["inputs"]) <= set(known), (wf.name, node_id, set(node["inputs"]) - set(known))
            assert set(spec.get("required", {})) <= set(node["inputs"]), (wf.name, node_id)
        for param in wf.parameters.values():
            node = wf.graph[param.node_id]
            kind = OBJECT_INFO[node["class_type"]]["input"]["required"][param.input_name][0]
            kind = kind if isinstance(kind, str) else "COMBO"  # a list of choices: a string
            expected = "image" if node["class_type"] == "LoadImage" else COMFY_TYPES.get(kind, "string")
            assert param.type == expected, (wf.name, param.name, kind)
    assert SHIPPED.get("sdxl_txt2img").parameters["prompt"].node_id == "6"
    assert SHIPPED.get("sdxl_txt2img").parameters["seed"].node_id == "3"
    face = SHIPPED.get("sdxl_ipadapter_face")
    assert face.graph["10"]["inputs"]["ipadapter_file"] == "ip-adapter-plus-face_sdxl_vit-h.safetensors"
    assert face.parameters["face"].required and face.graph[face.parameters["face"].node_id]["class_type"] == "LoadImage"


def test_shipped_models_are_in_the_manifest() -> None:
    import yaml

    manifest = {(m["folder"], m["filename"]) for m in yaml.safe_load((ROOT / "models.yaml").read_text())["models"]}
    loaders = {"CheckpointLoaderSimple": ("ckpt_name", "checkpoints"), "IPAdapterModelLoader": ("ipadapter_file",
               "ipadapter"), "CLIPVisionLoader": ("clip_name", "clip_vision")}
    for wf in SHIPPED.workflows.values():
        for node in wf.graph.values():
            if node["class_type"] in loaders:
                key, folder = loaders[node["class_type"]]
                assert (folder, node["inputs"][key]) in manifest, (wf.name, node)


def test_a_named_request_expands_to_a_graph_the_engine_accepts() -> None:
    request = {"workflow": "sdxl_txt2img", "inputs": {"prompt": "a red fox", "seed": 7, "cfg": 6},
               "timeout_s": 30, "response_format": "mime"}
    expanded = prepare_input(request, SHIPPED)
    assert expanded["workflow"]["6"]["inputs"]["text"] == "a red fox"
    assert expanded["workflow"]["3"]["inputs"]["seed"] == 7 and expanded["workflow"]["3"]["inputs"]["cfg"] == 6
    assert expanded["timeout_s"] == 30 and expanded["response_format"] == "mime" and "inputs" not in expanded
    parsed = parse_request(expanded, Settings())
    assert parsed.response_format == "mime" and parsed.timeout_s == 30 and not parsed.warnings
    assert SHIPPED.get("sdxl_txt2img").graph["6"]["inputs"]["text"] != "a red fox"  # the library is untouched


def test_an_image_parameter_becomes_an_image_of_the_request_or_stays_a_file_name() -> None:
    expanded = prepare_input({"workflow": "face", "inputs": {"face": FACE_B64}}, SHIPPED)
    assert expanded["workflow"]["12"]["inputs"]["image"] == "face.jpg"
    assert expanded["images"] == [{"name": "face.jpg", "image": FACE_B64}]
    parsed = parse_request(expanded, Settings())
    assert [i.name for i in parsed.images] == ["face.jpg"]
    uri = "data:image/png;base64,iVBORw0KGgo="
    assert prepare_input({"workflow": "face", "inputs": {"face": uri}}, SHIPPED)["images"][0]["name"] == "face.png"
    url = prepare_input({"workflow": "face", "inputs": {"face": "https://example.com/me.webp"}}, SHIPPED)
    assert url["images"] == [{"name": "face.png", "image": "https://example.com/me.webp"}]
    name = prepare_input({"workflow": "face", "inputs": {"face": "already-uploaded.png"}}, SHIPPED)
    assert name["workflow"]["12"]["inputs"]["image"] == "already-uploaded.png" and "images" not in name


@pytest.mark.parametrize("inputs, lines", [
    ({"promt": "x"}, ["workflow 'sdxl_txt2img' has no parameter 'promt' (parameters: prompt (string, default "]),
    ({"seed": "7"}, ["workflow 'sdxl_txt2img' parameter 'seed' must be an integer; got \"7\""]),
    ({"seed": True}, ["parameter 'seed' must be an integer; got true"]),
    ({"seed": -1}, ["parameter 'seed' must be at least 0; got -1"]),
    ({"steps": 1000}, ["parameter 'steps' must be at most 150; got 1000"]),
    ({"cfg": "high"}, ["parameter 'cfg' must be a number; got \"high\""]),
    ({"prompt": 5, "width": 1.5}, ["parameter 'prompt' must be a string; got 5",
                                   "parameter 'width' must be an integer; got 1.5"]),
])
def test_unknown_and_ill_typed_parameters_are_clear_errors(inputs: dict[str, Any], lines: list[str]) -> None:
    with pytest.raises(InvalidInputError) as info:
        prepare_input({"workflow": "sdxl_txt2img", "inputs": inputs}, SHIPPED)
    err = info.value
    assert err.kind == "invalid_input" and err.message.startswith("Invalid input: ")
    for line in lines:
        assert any(line in p for p in err.problems), (line, err.problems)
    assert len(err.problems) == len(lines)


def test_a_required_parameter_and_inputs_that_are_not_an_object() -> None:
    with pytest.raises(InvalidInputError, match=r"needs parameter 'face' \(face \(image, required\)\)"):
        prepare_input({"workflow": "sdxl_ipadapter_face", "inputs": {}}, SHIPPED)
    with pytest.raises(InvalidInputError, match=r"'inputs' must be an object of parameter values; got a list"):
        prepare_input({"workflow": "sdxl_txt2img", "inputs": ["a fox"]}, SHIPPED)


def test_an_unknown_name_lists_what_exists_and_graphs_pass_through() -> None:
    with pytest.raises(InvalidInputError) as info:
        prepare_input({"workflow": "sdxl_text2img"}, SHIPPED)
    assert info.value.message == "Invalid input: no workflow named 'sdxl_text2img'; available: sdxl_ipadapter_face, " \
                                 "sdxl_txt2img"
    graph_request = seed("001_request.json")["input"]
    assert prepare_input(graph_request, SHIPPED) is graph_request
    as_string = {"workflow": json.dumps(graph_request["workflow"])}
    assert not is_named_request(as_string) and prepare_input(as_string, SHIPPED) is as_string
    assert is_named_request({"workflow": "txt2img"}) and SHIPPED.get("txt2img").name == "sdxl_txt2img"


def test_a_broken_file_is_reported_by_name_and_the_others_still_load(tmp_path: Path) -> None:
    shutil.copy(ROOT / "workflows" / "sdxl_txt2img.json", tmp_path / "good.json")
    (tmp_path / "notjson.json").write_text("{")
    (tmp_path / "badparam.json").write_text(json.dumps({
        "parameters": {"x": {"node": "99", "input": "text"}},
        "workflow": {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "a"}}}}))
    (tmp_path / "link.json").write_text(json.dumps({
        "parameters": {"x": {"node": "2", "input": "images"}},
        "workflow": {"1": {"class_type": "EmptyImage", "inputs": {}},
                     "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}}))
    lib = WorkflowLibrary.load(tmp_path)
    assert lib.names() == ["good"]
    assert lib.broken["notjson"].startswith("cannot be read as JSON")
    assert lib.broken["badparam"] == "parameter 'x' names node 99, which is not in the workflow"
    assert lib.broken["link"] == "parameter 'x' names node 2 input 'images', which is a link, not a value"
    with pytest.raises(InvalidInputError, match="workflow 'link' cannot be used: parameter 'x' names node 2"):
        lib.get("link")


def test_parameter_declarations() -> None:
    doc = {"parameters": {
        "mode": {"node": "1", "input": "blend_mode", "choices": ["normal", "multiply"]},
        "extra": {"node": "1", "input": "new_input", "type": "float", "default": 0.5},
        "needed": {"node": "1", "input": "other", "type": "string"}},
        "workflow": {"1": {"class_type": "ImageBlend", "inputs": {"blend_mode": "normal"}}}}
    wf = parse_workflow("blend", doc)
    assert [p.describe() for p in wf.parameters.values()] == [
        'mode (string, default "normal")', "extra (float, default 0.5)", "needed (string, required)"]
    graph, images = wf.build({"mode": "multiply", "extra": 2, "needed": "x"})
    assert graph["1"]["inputs"] == {"blend_mode": "multiply", "new_input": 2, "other": "x"} and images == []
    with pytest.raises(InvalidInputError, match=r"must be one of \"normal\", \"multiply\"; got \"screen\""):
        wf.build({"mode": "screen", "needed": "x"})
    with pytest.raises(WorkflowFileError, match="has type 'text'; accepted: string, int, float, bool, image"):
        parse_workflow("x", {"parameters": {"a": {"node": "1", "input": "b", "type": "text"}},
                             "workflow": {"1": {"class_type": "X", "inputs": {}}}})
    with pytest.raises(WorkflowFileError, match="no value for 'b' to take the type from; declare 'type'"):
        parse_workflow("x", {"parameters": {"a": {"node": "1", "input": "b"}},
                             "workflow": {"1": {"class_type": "X", "inputs": {}}}})


def test_comfyui_deploys_record_is_read_and_its_classes_are_required(tmp_path: Path) -> None:
    shutil.copy(SEEDS / "004_deployment.json", tmp_path / "my_text_to_image.json")
    lib = WorkflowLibrary.load(tmp_path)
    wf = lib.get("12345678-1234-1234-1234-123456789012")
    assert wf.name == "my_text_to_image" and lib.get("My Text to Image Workflow") is wf
    assert {p.name: (p.node_id, p.input_name, p.type) for p in wf.parameters.values()} == {
        "prompt": ("6", "text", "string"), "seed": ("3", "seed", "int")}
    graph, _ = wf.build(seed("004_request_run.json")["inputs"])
    assert graph["6"]["inputs"]["text"] == "a beautiful sunset over mountains" and graph["3"]["inputs"]["seed"] == 42
    assert "KSampler" in required_classes(tmp_path, ())  # workflow_classes reads workflow_api graphs too
    assert "IPAdapterAdvanced" in required_classes(ROOT / "workflows", ())


def test_every_example_request_is_accepted_by_the_engines_parser() -> None:
    examples = sorted((ROOT / "examples").glob("*.json"))
    assert [p.name for p in examples] == ["named_sdxl_txt2img.json", "runsync_no_models.json"]
    for path in examples:
        body = json.loads(path.read_text())
        parsed = parse_request(prepare_input(body["input"], SHIPPED), Settings())
        assert parsed.workflow and not parsed.warnings, path.name
