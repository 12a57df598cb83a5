"""Response formats: a job result or failure in each client's shape, compared with the seeds' documentation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.errors import ERROR_KINDS, ExecutionError, JobTimeoutError, ValidationError
from supervisor.api.formats import COMPLETED, FAILED, TIMED_OUT, Outcome, failure, requested_format, success
from supervisor.jobs.job import JobResult
from supervisor.jobs.outputs import JobOutput
from tests.helpers.api import assert_shape, seed

PNG_B64 = seed("001_response_success.json")["output"]["images"][0]["data"]


def output(filename: str = "ComfyUI_00001_.png", media: str = "image/png", kind: str = "base64",
           data: str = PNG_B64) -> JobOutput:
    return JobOutput(filename=filename, node_id="9", media_type=media, size=123, data=data, kind=kind)  # type: ignore[arg-type]


def result(*outputs: JobOutput, errors: tuple[str, ...] = ()) -> JobResult:
    return JobResult(job_id="j", prompt_id="p", outputs=list(outputs), errors=list(errors), timings={})


def test_worker_comfyui_is_seed_001s_output() -> None:
    out = success(result(output(), errors=("Warning: Some non-fatal issue occurred",)), "worker-comfyui")
    assert out == Outcome(COMPLETED, output=seed("001_response_success.json")["output"])


def test_worker_comfyui_with_a_bucket_puts_the_url_in_data() -> None:
    url = "https://bucket.s3.example.com/sync-uuid-string/ComfyUI_00001_.png"
    out = success(result(output(kind="s3_url", data=url)), "worker-comfyui")
    assert out.output == {**seed("001_response_success_s3.json")["output"], "errors": []}


def test_mime_is_seed_002s_output() -> None:
    out = success(result(output(filename="ComfyUI_0001.png")), "mime")
    assert out.output == seed("002_response_output_success.json")


def test_results_is_seed_000s_response() -> None:
    out = success(result(output()), "results")
    assert out.output == seed("000_response_success.json") | {"results": [
        {"filename": "ComfyUI_00001_.png", "image": PNG_B64}]}
    assert_shape(out.output, seed("000_response_success.json"))


def test_base64_list_is_seed_003s_output() -> None:
    out = success(result(output()), "base64-list")
    assert out.output == seed("003_response_success.json")["output"]


@pytest.mark.parametrize("fmt", ["worker-comfyui", "mime", "results", "base64-list"])
def test_other_media_go_to_files_and_images_keep_their_order(fmt: str) -> None:
    video = output("clip_00001.mp4", "video/mp4", data="AAAA")
    first, second = output("a_00001_.png"), output("b_00001_.webp", "image/webp")
    body = success(result(first, video, second), fmt).output
    images = body["results"] if fmt == "results" else body["images"]
    assert len(images) == 2 and len(body["files"]) == 1
    if fmt == "base64-list":
        assert body["files"] == ["AAAA"]
    else:
        assert [i["filename"] for i in images] == ["a_00001_.png", "b_00001_.webp"]
        assert body["files"][0]["filename"] == "clip_00001.mp4"
    if fmt == "mime":
        assert [i["type"] for i in images] == ["image/png", "image/webp"] and body["files"][0]["type"] == "video/mp4"


def test_no_files_key_without_other_media_and_an_empty_result_is_still_a_shape() -> None:
    assert "files" not in success(result(output()), "mime").output
    assert success(result(errors=("the workflow finished but produced no output files",)), "worker-comfyui").output == {
        "images": [], "errors": ["the workflow finished but produced no output files"]}


def test_failures_are_failed_with_the_message_or_timed_out() -> None:
    err = ValidationError.with_problems("Workflow validation failed", ["node 30 (ckpt_name): 'model.safetensors' "
                                                                       "not in available models"])
    for fmt in ("worker-comfyui", "mime", "base64-list"):
        out = failure(err, fmt)
        assert out == Outcome(FAILED, error=err.describe())
        assert out.handler_return() == {"error": "Workflow validation failed: node 30 (ckpt_name): 'model.safetensors'"
                                                 " not in available models"}
    timeout = JobTimeoutError("Job timed out after 5 s while running node 3 (KSampler)")
    assert failure(timeout, "mime") == Outcome(TIMED_OUT, error="Job timed out after 5 s while running node 3 (KSampler)")
    assert failure(timeout, "mime").handler_return() == {"error": timeout.message}  # RunPod: FAILED


def test_results_reports_failures_inside_a_completed_job_like_seed_000() -> None:
    err = ExecutionError("Workflow execution error: node 31 (KSampler) raised Exception: boom")
    out = failure(err, "results")
    assert out == Outcome(COMPLETED, output={"status": "error", "message": err.message})
    assert_shape(out.output, seed("000_response_error.json"))
    timed = failure(JobTimeoutError("Job timed out after 1 s while waiting in ComfyUI's queue"), "results")
    assert timed.output["status"] == "timeout"
    assert_shape(timed.output, seed("000_response_timeout.json"))
    assert timed.handler_return() == timed.output  # COMPLETED on RunPod too


def test_several_problems_read_as_one_line_then_the_list() -> None:
    err = ValidationError.with_problems("Workflow validation failed", ["node 5 a", "node 5 b"])
    text = failure(err, "worker-comfyui").error
    assert text == "Workflow validation failed: 2 problems:\n- node 5 a\n- node 5 b"


def test_requested_format_reads_the_request_else_the_deployment() -> None:
    assert requested_format({"response_format": "MIME "}, "results") == "mime"
    assert requested_format({"response_format": "nope"}, "results") == "results"
    assert requested_format({"1": {"class_type": "X"}}, "base64-list") == "base64-list"
    assert requested_format("not even an object", "worker-comfyui") == "worker-comfyui"


@given(st.sampled_from(["worker-comfyui", "mime", "results", "base64-list"]),
       st.lists(st.tuples(st.text(min_size=1, max_size=20), st.sampled_from(["image/png", "video/mp4", "audio/wav"]),
                          st.sampled_from(["base64", "s3_url"])), max_size=4),
       st.lists(st.text(max_size=30), max_size=3), st.sampled_from(ERROR_KINDS), st.text(max_size=80))
def test_every_outcome_is_plain_json(fmt: str, files: list, warnings: list, kind: type, message: str) -> None:
    ok = success(result(*(output(n, m, k, "QUJD") for n, m, k in files), errors=tuple(warnings)), fmt)
    bad = failure(kind(message or "x"), fmt)
    for outcome in (ok, bad):
        value = outcome.handler_return()
        assert json.loads(json.dumps(value)) == value
        assert isinstance(value, dict)
