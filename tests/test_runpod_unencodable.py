"""RunPod mode: every result the handler returns can be sent, even when the job carried text UTF-8 cannot encode.

The defect of issue 14: ``{"workflow": "\\ud800"}`` (a lone surrogate, which JSON's ``\\u`` escapes allow) made
the error message repeat it; the UNMODIFIED RunPod SDK then failed to POST the result (``UnicodeEncodeError``,
"Task exception was never retrieved") and the job never finished on the platform. Here the SDK's own worker loop
takes such jobs from a loopback job server (tests/helpers/runpod_server.py) and every one of them gets its result
posted; then a normal job still completes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.runpod_server import RunPodJobServer
from tests.test_runpod_worker import runpod_worker

pytestmark = pytest.mark.timeout(120)

# node 2 of this graph raises with a message carrying the byte 0xff, which the stand-in ComfyUI reads from its
# environment as the lone surrogate \udcff and sends in its execution_error event as JSON
GRAPH = json.loads((Path(__file__).resolve().parents[1] / "examples" / "runsync_no_models.json").read_text())
GRAPH = GRAPH["input"]["workflow"]
FAULT = "2:error:blur broke on \udcff"
LONE = "a lone surrogate: not valid Unicode, so it cannot be stored or sent; send valid UTF-8 text"


def wait_error(rp: RunPodJobServer, job: str) -> str:
    result = rp.wait_result(job, timeout=30)
    assert set(result) == {"error"}, result
    error = result["error"]
    assert isinstance(error, str)
    error.encode("utf-8")  # it was sent, so it is encodable
    return error


def test_inputs_with_unencodable_text_fail_with_a_result_the_sdk_can_send(tmp_path: Path) -> None:
    with runpod_worker(tmp_path, models={}) as (rp, worker):
        cases = {
            rp.enqueue({"workflow": "\ud800"}): "input.workflow holds \\ud800 at character 0",
            rp.enqueue({"workflow": {**GRAPH, "9": {"class_type": "PrimitiveString", "inputs": {"value": "x\udfff"}}}}):
                'input.workflow["9"].inputs.value holds \\udfff at character 1',
            rp.enqueue({"workflow": GRAPH, "images": [{"name": "a\ud800.png", "image": "AAAA"}]}):
                "input.images[0].name holds \\ud800 at character 1",
            rp.enqueue({"workflow": "no-such-flow", "inputs": {"\udc80": 1}}):
                "a key of input.inputs ('\\udc80') holds \\udc80 at character 0",
            rp.enqueue("\ud83d"): "input holds \\ud83d at character 0",
        }
        for job, where in cases.items():
            assert wait_error(rp, job) == f"Invalid input: {where}, {LONE}"
        # the worker goes on: a normal job completes
        result = rp.wait_result(rp.enqueue({"workflow": GRAPH}), timeout=60)
        assert "output" in result and result["output"]["images"], result
    assert "Task exception was never retrieved" not in worker.log_text()
    assert "UnicodeEncodeError" not in worker.log_text()


def test_an_error_from_comfyui_with_unencodable_text_is_escaped_and_sent(tmp_path: Path) -> None:
    with runpod_worker(tmp_path, models={}, STANDIN_NODE_FAULT=FAULT) as (rp, worker):
        error = wait_error(rp, rp.enqueue({"workflow": GRAPH}))
        assert error.splitlines()[0] == ("Workflow execution error: node 2 (ImageBlur) raised Exception: blur broke "
                                         "on \\udcff"), error
    assert "UnicodeEncodeError" not in worker.log_text()
