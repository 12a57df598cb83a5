"""The seed fixtures (tests/fixtures/seeds) are well-formed, complete and faithful to the seeds.

* every fixture is JSON; the expected set of fixtures exists;
* every graph node is a class of the reference ``object_info-subset.json`` and its inputs are a subset of
  that class's inputs, every required input is present, links point at existing nodes with the right output
  type, scalar values are in range and combos are valid -- except the defects the seeds really have, which are
  listed here one by one and asserted to be STILL there (later tests need them);
* the model files ``models.json`` lists per fixture are exactly the ones its graph references;
* every base64 payload decodes to a real image of the format its data URI / file name / ``type`` announces;
* what the seed documents showed (node ids, class types, model names, option values, response fields) is
  unchanged in the fixtures (checked against the seed texts when the reference folder is present);
* NOTES.md covers every fixture.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "tests" / "fixtures" / "seeds"


def _reference_path(*parts: str) -> Path | None:
    for base in (ROOT / "tests" / "fixtures" / "reference", Path("/work/shared/reference")):
        candidate = base.joinpath(*parts)
        if candidate.exists():
            return candidate
    return None


SUBSET_PATH = _reference_path("object_info-subset.json")
# the seed documents, copied verbatim into tests/fixtures/seeds/source (the original reference folder as fallback)
SEED_TEXTS = SEEDS / "source" if (SEEDS / "source").is_dir() else _reference_path("seeds")


def load(name: str):
    return json.loads((SEEDS / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def subset() -> dict:
    assert SUBSET_PATH is not None, "object_info-subset.json not found (tests/fixtures/reference or /work/shared/reference)"
    return json.loads(SUBSET_PATH.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------- inventory
REQUESTS = [
    "000_request.json",
    "000_request_raw_base64.json",
    "001_request.json",
    "001_request_images.json",
    "002_request_txt2img.json",
    "002_request_faceid.json",
    "002_request_faceid_example.json",
    "003_request.json",
    "004_request_run.json",
    "004_request_upload_url.json",
]
RESPONSES = [
    "000_response_success.json",
    "000_response_error.json",
    "000_response_timeout.json",
    "001_response_success.json",
    "001_response_success_s3.json",
    "001_response_error.json",
    "001_response_error_messages.json",
    "002_response_run.json",
    "002_response_status_completed.json",
    "002_response_output_success.json",
    "002_response_output_error.json",
    "002_response_error_messages.json",
    "003_response_run.json",
    "003_response_in_progress.json",
    "003_response_success.json",
    "003_response_error.json",
    "004_response_run.json",
    "004_response_run_output.json",
    "004_response_upload_url.json",
]
OTHER = ["004_deployment.json", "models.json"]


def graph_of(name: str) -> dict:
    """The ComfyUI API graph a request fixture carries (where each seed's client puts it)."""
    doc = load(name)
    if name.startswith(("000_", "001_", "003_")):
        return doc["input"]["workflow"]
    if name.startswith("002_"):
        return doc["input"]  # seed 002 sends the graph itself as "input"
    if name in ("004_deployment.json", "004_request_run.json"):
        return load("004_deployment.json")["workflow_api"]
    raise KeyError(name)


GRAPH_FIXTURES = [n for n in REQUESTS if n != "004_request_upload_url.json"] + ["004_deployment.json"]
VALID_GRAPHS = [n for n in GRAPH_FIXTURES if "faceid" not in n]
FACEID = ["002_request_faceid.json", "002_request_faceid_example.json"]

# The seeds' real defects, kept on purpose. {fixture: {node_id: {...}}}
EXTRA_INPUTS = {  # inputs the class does not have (ComfyUI ignores them silently)
    "002_request_faceid.json": {"5": {"clip", "weight_faceidv2"}},
    "002_request_faceid_example.json": {"5": {"clip", "weight_faceidv2"}},
    "003_request.json": {"4": {"stop_at_clip_layer"}},
}
MISSING_REQUIRED = {  # required inputs the seed's graph lacks (ComfyUI: required_input_missing)
    "002_request_faceid.json": {"5": {"weight_type", "start_at", "end_at"}},
    "002_request_faceid_example.json": {"5": {"weight_type", "start_at", "end_at"}},
}
BAD_COMBOS = {  # combo values not among the options (ComfyUI: value_not_in_list)
    "002_request_faceid.json": {"5": {"combine_embeds": "Average"}},
    "002_request_faceid_example.json": {"5": {"combine_embeds": "Average"}},
}

# Which model folder a loader's file combo lists (ComfyUI folder keys).
MODEL_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoader", "lora_name"): "loras",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("IPAdapterModelLoader", "ipadapter_file"): "ipadapter",
}


def test_every_fixture_is_json_and_the_set_is_complete():
    present = {p.name for p in SEEDS.glob("*.json")}
    expected = set(REQUESTS + RESPONSES + OTHER)
    assert present == expected, f"missing: {sorted(expected - present)}, unexpected: {sorted(present - expected)}"
    for name in sorted(present):
        doc = load(name)
        assert isinstance(doc, (dict, list)), name
        assert doc, f"{name} is empty"


# ------------------------------------------------------------------------------------------ graphs
def is_link(value) -> bool:
    return isinstance(value, list)


def class_inputs(subset: dict, class_type: str) -> tuple[dict, dict]:
    info = subset[class_type]["input"]
    return info.get("required", {}), info.get("optional", {})


def image_names(name: str) -> set[str]:
    """File names the request makes available to LoadImage (uploaded by the worker before the prompt)."""
    doc = load(name)
    if isinstance(doc.get("input"), dict) and "images" in doc["input"]:
        return {img["name"] for img in doc["input"]["images"]}
    return set()


def model_refs(graph: dict) -> dict[str, list[str]]:
    refs: dict[str, set[str]] = {}
    for node in graph.values():
        for input_name, value in node["inputs"].items():
            folder = MODEL_INPUTS.get((node["class_type"], input_name))
            if folder and not is_link(value):
                refs.setdefault(folder, set()).add(value)
    return {k: sorted(v) for k, v in refs.items()}


@pytest.mark.parametrize("name", GRAPH_FIXTURES)
def test_graph_nodes_match_the_reference_classes(name, subset):
    graph = graph_of(name)
    models = load("models.json")[name]
    assert graph, name
    seen_extra: dict[str, set[str]] = {}
    seen_missing: dict[str, set[str]] = {}
    seen_bad: dict[str, dict[str, object]] = {}
    for node_id, node in graph.items():
        assert isinstance(node_id, str) and set(node) <= {"inputs", "class_type", "_meta"}, (name, node_id)
        class_type = node["class_type"]
        assert class_type in subset, f"{name} node {node_id}: {class_type} is not in object_info-subset.json"
        required, optional = class_inputs(subset, class_type)
        inputs = node["inputs"]

        extra = set(inputs) - set(required) - set(optional)
        if extra:
            seen_extra[node_id] = extra
        missing = set(required) - set(inputs)
        if missing:
            seen_missing[node_id] = missing

        for input_name, value in inputs.items():
            spec = required.get(input_name) or optional.get(input_name)
            if spec is None:
                continue  # an extra input: recorded above
            input_type = spec[0]
            opts = spec[1] if len(spec) > 1 else {}
            where = f"{name} node {node_id} ({class_type}).{input_name}"
            if is_link(value):
                assert len(value) == 2, where
                src_id, slot = value
                assert isinstance(src_id, str) and src_id in graph, f"{where}: link to missing node {src_id!r}"
                assert isinstance(slot, int), where
                outputs = subset[graph[src_id]["class_type"]]["output"]
                assert 0 <= slot < len(outputs), f"{where}: output {slot} of {graph[src_id]['class_type']}"
                assert outputs[slot] == input_type, f"{where}: receives {outputs[slot]}, wants {input_type}"
                continue
            if isinstance(input_type, list):
                folder = MODEL_INPUTS.get((class_type, input_name))
                if folder is not None:
                    options = list(input_type) + list(models.get(folder, []))
                elif class_type == "LoadImage":
                    options = sorted(image_names(name))
                else:
                    options = input_type
                if value not in options:
                    seen_bad.setdefault(node_id, {})[input_name] = value
                continue
            if input_type == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), where
            elif input_type == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), where
            elif input_type == "STRING":
                assert isinstance(value, str), where
            else:
                pytest.fail(f"{where}: a literal for a {input_type} input")
            if "min" in opts:
                assert value >= opts["min"], where
            if "max" in opts:
                assert value <= opts["max"], where

    # LoadImage in seed 002 carries the base64 itself (the worker rewrites it; ComfyUI would refuse it)
    if name.startswith("002_") and "6" in seen_bad:
        assert set(seen_bad["6"]) == {"image"} and graph["6"]["class_type"] == "LoadImage"
        decode_image(seen_bad["6"].pop("image"))
        del seen_bad["6"]

    assert seen_extra == EXTRA_INPUTS.get(name, {}), name
    assert seen_missing == MISSING_REQUIRED.get(name, {}), name
    assert seen_bad == BAD_COMBOS.get(name, {}), name


@pytest.mark.parametrize("name", GRAPH_FIXTURES)
def test_graph_has_one_reachable_save_image(name, subset):
    graph = graph_of(name)
    outputs = [nid for nid, n in graph.items() if subset[n["class_type"]].get("output_node")]
    assert [graph[o]["class_type"] for o in outputs] == ["SaveImage"], name
    # every node feeds the output (nothing dangling that ComfyUI would silently skip)
    reached: set[str] = set()
    stack = list(outputs)
    while stack:
        nid = stack.pop()
        if nid in reached:
            continue
        reached.add(nid)
        stack.extend(v[0] for v in graph[nid]["inputs"].values() if is_link(v))
    assert reached == set(graph), f"{name}: nodes not feeding the output: {sorted(set(graph) - reached)}"


def test_the_faceid_defects_are_still_there():
    for name in FACEID:
        node = graph_of(name)["5"]
        assert node["class_type"] == "IPAdapterAdvanced"
        assert node["inputs"]["combine_embeds"] == "Average"
        assert not {"weight_type", "start_at", "end_at"} & set(node["inputs"])
        assert node["inputs"]["embeds_scaling"] == "V only"
        assert node["inputs"]["weight"] == 1.0 and node["inputs"]["weight_faceidv2"] == 1.0


def test_models_json_lists_exactly_what_each_graph_loads():
    models = load("models.json")
    assert set(models) == set(GRAPH_FIXTURES) | {"004_request_upload_url.json"}
    assert models["004_request_upload_url.json"] == {}
    for name in GRAPH_FIXTURES:
        listed = {k: sorted(v) for k, v in models[name].items()}
        assert listed == model_refs(graph_of(name)), name
        for folder, files in listed.items():
            assert all(isinstance(f, str) and "/" not in f and f == f.strip() for f in files), (name, folder)


def test_seed_model_names_are_kept():
    models = load("models.json")
    assert models["002_request_faceid.json"] == {
        "checkpoints": ["lustifySDXLNSFW_ggwpV7.safetensors"],
        "clip_vision": ["CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"],
        "ipadapter": ["ip-adapter-faceid_sdxl.bin"],
    }
    assert models["003_request.json"] == {"checkpoints": ["ponyDiffusionV6XL.safetensors"]}
    assert models["001_request.json"] == {"checkpoints": ["flux1-dev-fp8.safetensors"]}
    assert "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors" in models["000_request.json"]["diffusion_models"]


def test_deployment_maps_every_named_input(subset):
    deployment = load("004_deployment.json")
    run = load("004_request_run.json")
    assert run["deployment_id"] == deployment["deployment_id"]
    assert set(run["inputs"]) == set(deployment["inputs"]) == {"prompt", "seed"}
    graph = deployment["workflow_api"]
    expected_types = {"prompt": "STRING", "seed": "INT"}
    for key, target in deployment["inputs"].items():
        node = graph[target["node_id"]]
        required, optional = class_inputs(subset, node["class_type"])
        spec = required.get(target["input_name"]) or optional.get(target["input_name"])
        assert spec is not None and spec[0] == expected_types[key], key
        assert not is_link(node["inputs"][target["input_name"]])
        assert type(run["inputs"][key]) is {"STRING": str, "INT": int}[spec[0]]


# ------------------------------------------------------------------------------------------ images
DATA_URI = re.compile(r"^data:(image/[a-z]+);base64,(.*)$", re.S)
MIME_OF = {"PNG": "image/png", "JPEG": "image/jpeg"}
EXT_OF = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg")}


def decode_image(b64: str) -> Image.Image:
    """Strict base64 -> a fully decoded Pillow image."""
    assert isinstance(b64, str) and b64, "empty base64"
    try:
        raw = base64.b64decode(b64, validate=True)
    except binascii.Error as exc:  # pragma: no cover - the assertion message is the point
        pytest.fail(f"not base64: {exc}")
    img = Image.open(io.BytesIO(raw))
    img.load()
    assert img.format in ("PNG", "JPEG"), img.format
    assert img.size == (64, 64), img.size
    return img


@pytest.mark.parametrize("name", ["000_request.json", "000_request_raw_base64.json", "001_request_images.json"])
def test_request_images_are_real_and_named_consistently(name):
    doc = load(name)
    images = doc["input"].get("images", [])
    assert images, name
    graph = graph_of(name)
    loaded = {n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"}
    assert {img["name"] for img in images} == loaded, name  # "name must match the workflow's image"
    for img in images:
        assert set(img) == {"name", "image"}
        m = DATA_URI.match(img["image"])
        payload = m.group(2) if m else img["image"]
        decoded = decode_image(payload)
        if m:
            assert m.group(1) == MIME_OF[decoded.format], (name, img["name"])
        assert img["name"].lower().endswith(EXT_OF[decoded.format]), (name, img["name"])
    assert len((SEEDS / name).read_bytes()) < 16_000, "keep fixtures small"


def test_both_documented_base64_forms_are_covered():
    with_prefix = load("000_request.json")["input"]["images"][0]["image"]
    without = load("000_request_raw_base64.json")["input"]["images"][0]["image"]
    assert with_prefix.startswith("data:image/jpeg;base64,/9j/")
    assert without.startswith("/9j/") and not without.startswith("data:")


@pytest.mark.parametrize("name", FACEID)
def test_faceid_load_image_carries_inline_base64(name):
    value = graph_of(name)["6"]["inputs"]["image"]
    assert not value.startswith("data:")
    assert decode_image(value).format == "JPEG"


def response_images(name: str) -> list[tuple[str, str | None]]:
    """(base64, declared type or None) for every image a response fixture carries inline."""
    doc = load(name)
    if name == "000_response_success.json":
        return [(r["image"], None) for r in doc["results"]]
    if name == "001_response_success.json":
        return [(i["data"], "base64") for i in doc["output"]["images"]]
    if name == "002_response_status_completed.json":
        return [(i["data"], i["type"]) for i in doc["output"]["images"]]
    if name == "002_response_output_success.json":
        return [(i["data"], i["type"]) for i in doc["images"]]
    if name == "003_response_success.json":
        return [(s, None) for s in doc["output"]["images"]]
    return []


@pytest.mark.parametrize("name", [n for n in RESPONSES if response_images(n)])
def test_response_images_are_real_pngs(name):
    for b64, declared in response_images(name):
        assert not b64.startswith("data:"), name
        img = decode_image(b64)
        assert img.format == "PNG", name
        if declared not in (None, "base64"):
            assert declared == "image/png"


# ------------------------------------------------------------------------------------------ response shapes
def shape(value):
    """Keys (recursively) and JSON types: what a client of the seed relies on."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


EXPECTED_SHAPES = {
    "000_response_success.json": {"status": "str", "results": [{"filename": "str", "image": "str"}]},
    "000_response_error.json": {"status": "str", "message": "str"},
    "000_response_timeout.json": {"status": "str", "message": "str"},
    "001_response_success.json": {
        "id": "str", "status": "str",
        "output": {"images": [{"filename": "str", "type": "str", "data": "str"}], "errors": ["str"]},
        "delayTime": "int", "executionTime": "int",
    },
    "001_response_success_s3.json": {
        "id": "str", "status": "str",
        "output": {"images": [{"filename": "str", "type": "str", "data": "str"}]},
        "delayTime": "int", "executionTime": "int",
    },
    "001_response_error.json": {"id": "str", "status": "str", "error": "str"},
    "002_response_run.json": {"id": "str", "status": "str"},
    "002_response_status_completed.json": {
        "id": "str", "status": "str", "output": {"images": [{"filename": "str", "data": "str", "type": "str"}]},
    },
    "002_response_output_success.json": {"images": [{"filename": "str", "data": "str", "type": "str"}]},
    "002_response_output_error.json": {"error": "str"},
    "003_response_run.json": {"id": "str", "status": "str"},
    "003_response_in_progress.json": {"id": "str", "status": "str"},
    "003_response_success.json": {"id": "str", "status": "str", "output": {"images": ["str"]}, "executionTime": "int"},
    "003_response_error.json": {"id": "str", "status": "str", "error": "str"},
    "004_response_run.json": {"run_id": "str"},
    "004_response_run_output.json": {
        "id": "str", "created_at": "str", "updated_at": "str", "status": "str",
        "workflow_inputs": {"prompt": "str", "seed": "int"},
        "workflow_outputs": {"images": [{"filename": "str", "url": "str", "type": "str"}]},
        "error": "NoneType",
    },
    "004_response_upload_url.json": {"upload_url": "str", "file_url": "str", "expires_at": "str"},
}
EXPECTED_STATUS = {
    "000_response_success.json": "completed",
    "000_response_error.json": "error",
    "000_response_timeout.json": "timeout",
    "001_response_success.json": "COMPLETED",
    "001_response_success_s3.json": "COMPLETED",
    "001_response_error.json": "FAILED",
    "002_response_run.json": "IN_QUEUE",
    "002_response_status_completed.json": "COMPLETED",
    "003_response_run.json": "IN_QUEUE",
    "003_response_in_progress.json": "IN_PROGRESS",
    "003_response_success.json": "COMPLETED",
    "003_response_error.json": "FAILED",
    "004_response_run_output.json": "success",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_response_shapes(name):
    doc = load(name)
    assert shape(doc) == EXPECTED_SHAPES[name]
    if name in EXPECTED_STATUS:
        assert doc["status"] == EXPECTED_STATUS[name]


def test_documented_error_messages():
    assert load("001_response_error_messages.json") == {
        "workflow_validation_failed": {
            "error": "Workflow validation failed: Node 30 (ckpt_name): 'model.safetensors' not in available models"
        },
        "missing_input_images": {"error": "Failed to upload one or more input images"},
        "comfyui_unreachable": {"error": "ComfyUI server (127.0.0.1:8188) not reachable after multiple retries"},
        "execution_error": {
            "error": "Workflow execution error: Node Type: KSampler, Node ID: 31, Message: CUDA out of memory"
        },
    }
    assert set(load("002_response_error_messages.json")) == {
        "no_prompt", "comfyui_error", "no_output_images", "timeout", "comfyui_died"
    }
    assert load("002_response_error_messages.json")["no_prompt"] == {"error": "No prompt provided in input"}
    assert load("001_response_success_s3.json")["output"]["images"][0]["type"] == "s3_url"
    assert load("001_response_success.json")["output"]["images"][0]["type"] == "base64"


# ------------------------------------------------------------------------------------------ fidelity to the seed texts
PLACEHOLDERS = {
    "base64-encoded-face-image",
    "base64-encoded-face-image-data",
    "base64-encoded-image-data",
    "base64_encoded_image_data",
}


def _strip_comments(text: str) -> str:
    return re.sub(r"(?m)(?<=\s)//[^\n]*$", "", text)


def seed_blocks(prefix: str) -> list:
    """Every JSON document in a seed text: ```json fences and curl ``-d '...'`` bodies that parse."""
    if SEED_TEXTS is None:
        pytest.skip("seed texts not available (reference folder absent)")
    (path,) = sorted(SEED_TEXTS.glob(f"{prefix}_*.txt"))
    text = path.read_text(encoding="utf-8")
    raw = re.findall(r"```json\n(.*?)```", text, re.S) + re.findall(r"-d '(.*?)'", text, re.S)
    blocks = []
    for chunk in raw:
        try:
            blocks.append(json.loads(_strip_comments(chunk)))
        except json.JSONDecodeError:
            continue
    return blocks


def conforms(seed, fixture, where="$") -> None:
    """``fixture`` says what ``seed`` says; seed placeholders ("...", named ones) hold real base64 images."""
    if isinstance(seed, str) and (seed.endswith("...") or seed in PLACEHOLDERS):
        assert isinstance(fixture, str), where
        if seed.startswith("data:"):
            assert fixture.startswith(seed.split(",", 1)[0] + ","), where
            fixture = fixture.split(",", 1)[1]
        decode_image(fixture)
        return
    if isinstance(seed, dict):
        assert isinstance(fixture, dict) and set(fixture) == set(seed), f"{where}: keys {set(fixture) ^ set(seed)}"
        assert list(fixture) == list(seed), f"{where}: key order"
        for k in seed:
            conforms(seed[k], fixture[k], f"{where}.{k}")
        return
    if isinstance(seed, list):
        assert isinstance(fixture, list) and len(fixture) == len(seed), where
        for i, (s, f) in enumerate(zip(seed, fixture)):
            conforms(s, f, f"{where}[{i}]")
        return
    assert fixture == seed and type(fixture) is type(seed), f"{where}: {fixture!r} != seed {seed!r}"


def find_block(prefix: str, predicate):
    matches = [b for b in seed_blocks(prefix) if isinstance(b, dict) and predicate(b)]
    assert matches, f"no block in seed {prefix} matches"
    return matches[0]


def test_seed_000_fragments_are_kept():
    fragment = find_block("000", lambda b: "workflow" in b and "2" in b["workflow"])
    for name in ("000_request.json", "000_request_raw_base64.json"):
        conforms(fragment["workflow"]["2"], graph_of(name)["2"])
    assert graph_of("000_request.json")["40"] == {"inputs": {"image": "image.jpg"}, "class_type": "LoadImage"}
    named = find_block("000", lambda b: "images" in b)
    assert load("000_request_raw_base64.json")["input"]["images"][0]["name"] == named["images"][0]["name"]
    conforms(find_block("000", lambda b: b.get("status") == "completed"), load("000_response_success.json"))
    conforms(find_block("000", lambda b: b.get("status") == "error"), load("000_response_error.json"))
    conforms(find_block("000", lambda b: b.get("status") == "timeout"), load("000_response_timeout.json"))


def test_seed_001_fragment_and_responses_are_kept():
    body = find_block("001", lambda b: "6" in b.get("input", {}).get("workflow", {}))
    for name in ("001_request.json", "001_request_images.json"):
        for node_id, node in body["input"]["workflow"].items():
            conforms(node, graph_of(name)[node_id], f"{name}:{node_id}")
    conforms(find_block("001", lambda b: b.get("status") == "COMPLETED"), load("001_response_success.json"))
    conforms(find_block("001", lambda b: b.get("status") == "FAILED"), load("001_response_error.json"))
    images = find_block(
        "001", lambda b: [i.get("name") for i in b.get("input", {}).get("images", [])] == ["input.png"]
    )["input"]["images"]
    fixture_images = load("001_request_images.json")["input"]["images"]
    conforms(images, fixture_images)
    for key, expected in load("001_response_error_messages.json").items():
        assert find_block("001", lambda b, e=expected: b == e), key


def test_seed_002_graphs_are_kept():
    txt2img = find_block("002", lambda b: "1" in b and "5" not in b)
    conforms(txt2img, graph_of("002_request_txt2img.json"))
    faceid = find_block("002", lambda b: "5" in b)
    conforms(faceid, graph_of("002_request_faceid.json"))
    example = graph_of("002_request_faceid_example.json")
    assert example["7"]["inputs"]["text"] == "a portrait of a beautiful woman, high quality, detailed"
    assert example["8"]["inputs"]["text"] == "ugly, blurry, low quality, deformed, bad anatomy"
    for node_id in faceid:
        if node_id not in ("6", "7", "8"):
            conforms(faceid[node_id], example[node_id], node_id)
    conforms(find_block("002", lambda b: b.get("status") == "IN_QUEUE"), load("002_response_run.json"))
    conforms(find_block("002", lambda b: b.get("id") == "abc123-uuid"), load("002_response_status_completed.json"))
    conforms(find_block("002", lambda b: "images" in b and "id" not in b), load("002_response_output_success.json"))
    conforms(find_block("002", lambda b: set(b) == {"error"}), load("002_response_output_error.json"))


def test_seed_003_graph_and_responses_are_kept():
    body = find_block("003", lambda b: "3" in b.get("input", {}).get("workflow", {}))
    conforms(body, load("003_request.json"))
    conforms(find_block("003", lambda b: b.get("status") == "IN_QUEUE"), load("003_response_run.json"))
    conforms(find_block("003", lambda b: b.get("status") == "IN_PROGRESS"), load("003_response_in_progress.json"))
    conforms(find_block("003", lambda b: b.get("id") == "unique-job-id" and b.get("status") == "COMPLETED"),
             load("003_response_success.json"))
    conforms(find_block("003", lambda b: b.get("id") == "unique-job-id" and b.get("status") == "FAILED"),
             load("003_response_error.json"))


def test_seed_004_requests_and_responses_are_kept():
    conforms(find_block("004", lambda b: "deployment_id" in b), load("004_request_run.json"))
    conforms(find_block("004", lambda b: "content_type" in b), load("004_request_upload_url.json"))
    conforms(find_block("004", lambda b: set(b) == {"run_id"}), load("004_response_run.json"))
    conforms(find_block("004", lambda b: "workflow_outputs" in b), load("004_response_run_output.json"))
    conforms(find_block("004", lambda b: "upload_url" in b), load("004_response_upload_url.json"))
    # the supplied deployment saves under the documented prefix ("output_00001.png"; ComfyUI itself names
    # the file "output_00001_.png" -- see NOTES.md)
    graph = load("004_deployment.json")["workflow_api"]
    assert graph["9"]["inputs"]["filename_prefix"] == "output"


# ------------------------------------------------------------------------------------------ notes
def test_notes_cover_every_fixture():
    notes = (SEEDS / "NOTES.md").read_text(encoding="utf-8")
    for name in REQUESTS + RESPONSES + OTHER:
        assert f"`{name}`" in notes, f"NOTES.md does not describe {name}"
    for defect in ("weight_type", "start_at", "end_at", "Average", "stop_at_clip_layer", "weight_faceidv2"):
        assert defect in notes
