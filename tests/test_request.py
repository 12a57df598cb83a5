"""The request parser: every form the seeds use, every option, and exact messages for what is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from supervisor.config import Settings
from supervisor.errors import InvalidInputError, JobError, ValidationError
from supervisor.jobs.request import JobRequest, parse_request

SEEDS = Path(__file__).parent / "fixtures" / "seeds"
SETTINGS = Settings(job_timeout_s=600.0, max_job_timeout_s=900.0)

GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
}


def seed_input(name: str) -> Any:
    return json.loads((SEEDS / name).read_text())["input"]


def parse(raw: Any) -> JobRequest:
    return parse_request(raw, SETTINGS)


def error_of(raw: Any) -> JobError:
    with pytest.raises(JobError) as info:
        parse(raw)
    return info.value


# --- the seeds' forms -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, images",
    [
        ("000_request.json", ["image.jpg"]),
        ("000_request_raw_base64.json", ["91771d9aa876d0d6f931ca1ab14b8a30.jpg"]),
        ("001_request.json", []),
        ("001_request_images.json", ["input.png"]),
        ("003_request.json", []),
    ],
)
def test_wrapped_seed_forms(fixture: str, images: list[str]) -> None:
    raw = seed_input(fixture)
    req = parse(raw)
    assert req.form == "workflow"
    assert list(req.workflow) == list(raw["workflow"])  # the request's node order is kept
    assert [i.name for i in req.images] == images
    assert req.inline_images == ()
    assert req.timeout_s == 600.0 and req.image_format == "png" and req.include_temp is False


def test_seed_000_data_uri_and_raw_base64_are_both_base64_kinds() -> None:
    assert parse(seed_input("000_request.json")).images[0].kind == "data_uri"
    assert parse(seed_input("000_request_raw_base64.json")).images[0].kind == "base64"


@pytest.mark.parametrize("fixture", ["002_request_faceid.json", "002_request_faceid_example.json"])
def test_seed_002_graph_as_input_with_inline_base64(fixture: str) -> None:
    req = parse(seed_input(fixture))
    assert req.form == "graph"
    assert [(i.node_id, i.input_name, i.kind) for i in req.inline_images] == [("6", "image", "base64")]
    assert req.images == () and req.warnings == ()


def test_seed_002_txt2img_graph_has_no_inline_images() -> None:
    req = parse(seed_input("002_request_txt2img.json"))
    assert req.form == "graph" and req.inline_images == ()


def test_the_graph_is_a_private_copy() -> None:
    raw = {"workflow": json.loads(json.dumps(GRAPH))}
    req = parse(raw)
    req.workflow["2"]["inputs"]["filename_prefix"] = "changed"
    assert raw["workflow"]["2"]["inputs"]["filename_prefix"] == "x"


def test_graph_form_ignores_option_like_node_ids() -> None:
    graph = dict(GRAPH, timeout_s={"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}})
    req = parse(graph)
    assert req.form == "graph" and req.timeout_s == 600.0 and "timeout_s" in req.workflow


def test_prompt_is_another_name_for_workflow_and_a_json_string_is_accepted() -> None:
    assert parse({"prompt": GRAPH}).workflow == GRAPH
    assert parse({"workflow": json.dumps(GRAPH)}).workflow == GRAPH


def test_inline_sources_in_image_inputs() -> None:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "data:image/png;base64,AAAA"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "https://example.com/a.png"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "sub/photo.png [input]"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "QUJD" * 20}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "https://example.com/a.png"}},
    }
    req = parse({"workflow": graph})
    assert [(i.node_id, i.kind) for i in req.inline_images] == [("1", "data_uri"), ("2", "url"), ("5", "base64")]


# --- refusals ----------------------------------------------------------------------------------------------


def test_ui_format_is_refused_with_export_hint() -> None:
    ui = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}], "links": [[1, 4, 0, 3, 0, "MODEL"]]}
    expected = (
        "Invalid input: this is a UI-format workflow (it has 'nodes' and 'links'); in ComfyUI use "
        "Workflow > Export (API) and send that file's content as the workflow"
    )
    assert error_of({"workflow": ui}).message == expected
    assert error_of(ui).message == expected
    assert error_of(ui).kind == "invalid_input"


@pytest.mark.parametrize(
    "raw, message",
    [
        (None, "Invalid input: the job input must be a JSON object holding a 'workflow' (ComfyUI API format) or the workflow itself; got null"),
        ([GRAPH], "Invalid input: the job input must be a JSON object holding a 'workflow' (ComfyUI API format) or the workflow itself; got a list"),
        ({}, "Invalid input: the job input is empty; send {\"workflow\": {...}} with a ComfyUI API-format workflow (Workflow > Export (API))"),
        ({"images": []}, "Invalid input: no 'workflow' in the job input (keys given: 'images'); send {\"workflow\": {...}} with a ComfyUI API-format workflow, or the workflow itself"),
        ({"workflow": []}, "Invalid input: 'workflow' must be an object mapping node ids to {\"class_type\", \"inputs\"}; got a list"),
        ({"workflow": {}}, "Invalid input: 'workflow' is empty; it must hold at least one node"),
        ({"workflow": "{nope"}, "Invalid input: 'workflow' is a string but not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        ({"workflow": GRAPH, "prompt": GRAPH}, "Invalid input: give either 'workflow' or 'prompt', not both"),
    ],
)
def test_shape_errors(raw: Any, message: str) -> None:
    err = error_of(raw)
    assert isinstance(err, InvalidInputError)
    assert err.message == message


def test_graph_structure_errors_are_validation_errors_one_line_per_node() -> None:
    graph = {
        "1": {"inputs": {}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["99", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0, 7]}},
        "4": "nope",
    }
    err = error_of({"workflow": graph})
    assert isinstance(err, ValidationError)
    assert err.problems == (
        'node 1 has no class_type (the node\'s type, e.g. "KSampler")',
        'node 4 must be an object {"class_type", "inputs"}; got a string',
        "node 2 (SaveImage) input images: links to node 99, which is not in the workflow",
        'node 3 (SaveImage) input images: ["1", 0, 7] is not a link [node_id, output_index]; to pass a literal '
        'list write {"__value__": [...]}',
    )
    assert err.message.startswith("Workflow validation failed: 4 problems: node 1 has no class_type")
    assert err.describe().splitlines()[0] == "Workflow validation failed: 4 problems:"


def test_graph_with_one_broken_node_as_whole_input_gets_per_node_message() -> None:
    err = error_of({"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"inputs": {}}})
    assert err.message == 'Workflow validation failed: node 2 has no class_type (the node\'s type, e.g. "KSampler")'


def test_integer_link_ids_are_normalised() -> None:
    graph = {"1": GRAPH["1"], "2": {"class_type": "SaveImage", "inputs": {"images": [1, 0]}}}
    assert parse({"workflow": graph}).workflow["2"]["inputs"]["images"] == ["1", 0]


@pytest.mark.parametrize(
    "images, problem",
    [
        ([{"name": "../../etc/passwd", "image": "AAAA"}], "images[0] name '../../etc/passwd' must be a plain file name (no '/', '\\' or '..')"),
        ([{"name": "a\x00.png", "image": "AAAA"}], "images[0] name 'a\\x00.png' must not contain a NUL character"),
        ([{"name": "notes.txt", "image": "AAAA"}], "images[0] name 'notes.txt' must end with an image extension (.png, .jpg, .jpeg, .webp, .gif, .bmp, .tif, .tiff)"),
        ([{"name": "a.png", "image": ""}], "images[0] 'a.png' has no 'image' (base64, a data URI or an http(s) URL)"),
        ([{"image": "AAAA"}], "images[0] has no 'name' (the file name the workflow refers to)"),
        (["AAAA"], 'images[0] must be an object {"name", "image"}; got a string'),
    ],
)
def test_image_entry_errors(images: list[Any], problem: str) -> None:
    err = error_of({"workflow": GRAPH, "images": images})
    assert isinstance(err, InvalidInputError)
    assert err.message == f"Failed to upload one or more input images: {problem}"


def test_duplicate_image_names_and_images_not_a_list() -> None:
    dup = [{"name": "a.png", "image": "AAAA"}, {"name": "a.png", "image": "BBBB"}]
    assert error_of({"workflow": GRAPH, "images": dup}).message == (
        "Failed to upload one or more input images: images[1] name 'a.png' is given twice"
    )
    assert error_of({"workflow": GRAPH, "images": {"a.png": "AAAA"}}).message == (
        "Failed to upload one or more input images: 'images' must be a list of {\"name\", \"image\"} objects; got an object"
    )


# --- options ----------------------------------------------------------------------------------------------


def test_options_are_read_and_validated() -> None:
    req = parse({"workflow": GRAPH, "timeout_s": 5, "response_format": "MIME", "image_format": "JPG",
                 "image_quality": 70, "include_temp": "yes"})
    assert (req.timeout_s, req.response_format, req.image_format, req.image_quality, req.include_temp) == (
        5.0, "mime", "jpeg", 70, True)


def test_timeout_is_capped_with_a_warning() -> None:
    req = parse({"workflow": GRAPH, "timeout_s": 10_000})
    assert req.timeout_s == 900.0
    assert req.warnings == ("timeout_s 10000 is above this worker's maximum; capped to 900 s (MAX_JOB_TIMEOUT_S)",)


def test_default_timeout_never_exceeds_the_maximum() -> None:
    req = parse_request({"workflow": GRAPH}, Settings(job_timeout_s=600, max_job_timeout_s=60))
    assert req.timeout_s == 60


def test_every_bad_option_is_reported_at_once() -> None:
    err = error_of({"workflow": GRAPH, "timeout_s": "soon", "response_format": "xml", "image_format": "gif",
                    "image_quality": 101, "include_temp": "maybe"})
    assert err.problems == (
        "timeout_s must be a number of seconds greater than 0; got 'soon'",
        "response_format must be one of worker-comfyui, mime, results, base64-list; got 'xml'",
        "image_format must be one of png, jpeg, webp; got 'gif'",
        "image_quality must be an integer from 1 to 100; got 101",
        "include_temp 1/0/true/false/yes/no (any case); got 'maybe'",
    )
    assert err.message.startswith("Invalid input: 5 problems: timeout_s must be")


def test_unknown_option_is_a_warning() -> None:
    req = parse({"workflow": GRAPH, "webhook": "x"})
    assert req.warnings == (
        "input.webhook is not a known option and was ignored (known: workflow, images, timeout_s, "
        "response_format, image_format, image_quality, include_temp)",
    )


# --- property: any JSON gives a job or a clear error -------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
node_like = st.fixed_dictionaries(
    {},
    optional={
        "class_type": st.one_of(st.sampled_from(["LoadImage", "SaveImage", "KSampler"]), json_values),
        "inputs": st.one_of(
            st.dictionaries(
                st.sampled_from(["image", "images", "seed", "text"]),
                st.one_of(json_values, st.lists(st.one_of(st.sampled_from(["1", "2"]), st.integers(0, 3)), max_size=3),
                          st.sampled_from(["data:image/png;base64,!!", "http://127.0.0.1/x.png", "QUJD" * 10])),
                max_size=3,
            ),
            json_values,
        ),
    },
)
graphs = st.dictionaries(st.sampled_from(["1", "2", "3"]), st.one_of(node_like, json_values), max_size=3)
requests = st.one_of(
    json_values,
    graphs,
    st.fixed_dictionaries(
        {"workflow": st.one_of(graphs, json_values)},
        optional={
            "images": st.one_of(
                st.lists(st.fixed_dictionaries({}, optional={"name": st.one_of(st.text(max_size=12), json_values),
                                                             "image": st.one_of(st.text(max_size=12), json_values)}),
                         max_size=3),
                json_values,
            ),
            "timeout_s": json_values,
            "response_format": st.one_of(st.sampled_from(["mime", "results"]), json_values),
            "image_format": st.one_of(st.sampled_from(["png", "jpg", "webp"]), json_values),
            "image_quality": json_values,
            "include_temp": json_values,
            "nodes": json_values,
            "links": json_values,
        },
    ),
)


@hsettings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_any_json_gives_a_job_or_a_clear_error(raw: Any) -> None:
    try:
        req = parse(raw)
    except JobError as err:
        assert err.kind in ("invalid_input", "validation")
        assert err.message and "\n" not in err.message
        assert all(p and "\n" not in p for p in err.problems)
        return
    assert isinstance(req, JobRequest)
    assert req.workflow and all(isinstance(n["class_type"], str) for n in req.workflow.values())
    assert 0 < req.timeout_s <= SETTINGS.max_job_timeout_s
    json.dumps(req.workflow)  # what goes to ComfyUI stays JSON


@hsettings(max_examples=300, deadline=None)
@given(st.text(max_size=2000))
def test_any_text_as_workflow_string_gives_a_job_or_a_clear_error(text: str) -> None:
    try:
        parse({"workflow": text})
    except JobError as err:
        assert "\n" not in err.message


def test_deeply_nested_values_are_a_clear_error_not_a_crash() -> None:
    deep = json.loads("[" * 900 + "]" * 900)
    err = error_of({"workflow": {"1": {"class_type": "X", "inputs": {"a": deep}}}})
    assert err.message == "Invalid input: the input is nested too deeply"
