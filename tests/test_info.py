"""``GET /info`` and the build record it reads (supervisor/build_record.py).

The image build writes the record; here the test writes one (the format of docs/operations.md) and points
``BUILD_RECORD_FILE`` at it. /info must report what the record says, ComfyUI's version as the running ComfyUI
reports it, the named workflows, and the labels the record implies (the same function the image's labels must
follow); a missing or broken record is reported, never a 500.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor import __version__
from supervisor.build_record import LABEL_ARGS, BuildRecord, labels, parse
from tests.helpers.api import ROOT, api_worker, http_get

pytestmark = pytest.mark.timeout(120)

KEY = "info-key-0123"
COMMIT_UI = "a" * 40
COMMIT_IPA = "9d076a3df0d2763cef5510ec5ab807f6632c39f5"
SHA = "c" * 64
RECORD: dict[str, Any] = {
    "format": 1,
    "built_at": "2026-01-31T12:00:00Z",
    "worker": {"version": __version__, "revision": "b" * 40, "source": "https://example.com/comfyui-worker"},
    "comfyui": {"version": "0.3.64", "ref": "v0.3.64", "commit": COMMIT_UI,
                "repo": "https://github.com/comfyanonymous/ComfyUI.git"},
    "custom_nodes": [{"name": "ComfyUI_IPAdapter_plus", "url": "https://github.com/cubiq/ComfyUI_IPAdapter_plus",
                      "commit": COMMIT_IPA}],
    "models": [{"name": "sdxl-base", "path": "checkpoints/sd_xl_base_1.0.safetensors", "sha256": SHA,
                "size": 6938078334}],
}
EXPECTED_LABELS = {
    "org.opencontainers.image.version": __version__,
    "org.opencontainers.image.revision": "b" * 40,
    "org.opencontainers.image.source": "https://example.com/comfyui-worker",
    "org.opencontainers.image.created": "2026-01-31T12:00:00Z",
    "comfyui-worker.comfyui.version": "0.3.64",
    "comfyui-worker.comfyui.ref": "v0.3.64",
    "comfyui-worker.comfyui.commit": COMMIT_UI,
    "comfyui-worker.custom-nodes": f'[{{"name":"ComfyUI_IPAdapter_plus","commit":"{COMMIT_IPA}"}}]',
    "comfyui-worker.models": f'[{{"path":"checkpoints/sd_xl_base_1.0.safetensors","sha256":"{SHA}"}}]',
}
WORKFLOW = {"description": "a grey square", "aliases": ["square"],
            "parameters": {"size": {"node": "1", "input": "width"}},
            "workflow": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                       "color": 0}},
                         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "sq"}}}}


def test_labels_follow_the_record() -> None:
    record = parse(RECORD)
    assert labels(record) == EXPECTED_LABELS
    assert parse(record.to_dict()) == record
    assert labels(parse({"format": 1})) == {}  # nothing known, nothing claimed


@pytest.mark.parametrize("body,words", [
    ([], "not a JSON object"),
    ({"format": 2}, "'format' is 2; this worker reads format 1"),
    ({"format": 1, "worker": "x"}, "'worker' must be an object"),
    ({"format": 1, "comfyui": {"commit": 7}}, "'comfyui.commit' must be a string, not int"),
    ({"format": 1, "models": {}}, "'models' must be a list"),
    ({"format": 1, "models": [{"path": "a", "size": -1}]}, "'models[0].size' must be a number of bytes"),
    ({"format": 1, "custom_nodes": [{"commit": ["x"]}]}, "'custom_nodes[0].commit' must be a string"),
])
def test_a_broken_record_names_what_is_wrong(body: Any, words: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(body)
    assert words in str(info.value)


def test_the_labels_command_runs_on_a_bare_python(tmp_path: Path) -> None:
    """The build can compute the labels with a plain python3 (no worker dependencies): standard library only."""
    path = tmp_path / "record.json"
    path.write_text(json.dumps(RECORD))
    proc = subprocess.run([sys.executable, "-S", "-m", "supervisor.build_record", "labels", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == EXPECTED_LABELS
    bad = subprocess.run([sys.executable, "-S", "-m", "supervisor.build_record", "labels", str(tmp_path / "no")],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "no such file" in bad.stderr


def test_info_reports_the_record_the_live_comfyui_and_the_workflows(tmp_path: Path) -> None:
    record_path = tmp_path / "build-record.json"
    record_path.write_text(json.dumps(RECORD))
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "grey_square.json").write_text(json.dumps(WORKFLOW))
    with api_worker(tmp_path, API_KEY=KEY, BUILD_RECORD_FILE=str(record_path), WORKFLOWS_DIR=str(workflows)) as w:
        assert http_get(f"{w.api.base}/info")[0] == 401
        info = w.api.ok("GET", "/info")
        assert info["worker"] == {"version": __version__, "revision": "b" * 40,
                                  "source": "https://example.com/comfyui-worker", "mode": "http"}
        assert info["comfyui"] == {"version": "0.3.64", "ref": "v0.3.64", "commit": COMMIT_UI, "state": "ready"}
        assert info["custom_nodes"] == RECORD["custom_nodes"]
        assert info["models"] == RECORD["models"]
        assert info["workflows"] == [{"name": "grey_square", "aliases": ["square"], "description": "a grey square"}]
        assert info["build"] == {"record": "found", "path": str(record_path), "built_at": "2026-01-31T12:00:00Z"}
        assert info["labels"] == EXPECTED_LABELS

        # read on every request: a broken record is reported (not a 500), a missing one too
        record_path.write_text("{not json")
        info = w.api.ok("GET", "/info")
        assert info["build"]["record"].startswith(f"unusable: {record_path}: ")
        assert info["models"] == [] and info["labels"] == {}
        record_path.unlink()
        info = w.api.ok("GET", "/info")
        assert info["build"]["record"] == f"none at {record_path} (not an image build, or BUILD_RECORD_FILE)"
        assert info["comfyui"]["version"] == "0.3.64"  # asked from the running ComfyUI, not the record
        assert info["comfyui"]["commit"] is None and info["custom_nodes"] == []
        assert "Traceback" not in w.log_text()


def test_an_empty_record_is_a_record_with_nothing_known() -> None:
    assert parse({"format": 1}) == BuildRecord()


def test_what_the_build_sets_last_is_stamped_on_the_record(tmp_path: Path) -> None:
    """The image's file has no revision, source or build time (they change every build): the BUILD_* ENV that
    the Dockerfile sets last does, and /info, the labels command and the build args all say the same."""
    in_file = {**RECORD, "worker": {"version": __version__}}
    del in_file["built_at"]
    record_path = tmp_path / "build-record.json"
    record_path.write_text(json.dumps(in_file))
    stamp = {"BUILD_REVISION": "b" * 40, "BUILD_SOURCE": "https://example.com/comfyui-worker",
             "BUILD_CREATED": "2026-01-31T12:00:00Z"}
    flags = ["--revision", stamp["BUILD_REVISION"], "--source", stamp["BUILD_SOURCE"],
             "--created", stamp["BUILD_CREATED"]]

    def command(*argv: str) -> str:
        proc = subprocess.run([sys.executable, "-S", "-m", "supervisor.build_record", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert json.loads(command("labels", str(record_path), *flags)) == EXPECTED_LABELS
    args = dict(line.split("=", 1) for line in command("build-args", str(record_path), *flags).splitlines())
    assert args["BUILD_REVISION"] == "b" * 40 and args["LABEL_VERSION"] == __version__
    assert {key: args[arg] for key, arg in LABEL_ARGS.items()} == EXPECTED_LABELS
    unstamped = dict(line.split("=", 1) for line in command("build-args", str(record_path)).splitlines())
    assert unstamped["BUILD_REVISION"] == "" and unstamped["LABEL_MODELS"] == EXPECTED_LABELS[
        "comfyui-worker.models"]

    with api_worker(tmp_path, API_KEY=KEY, BUILD_RECORD_FILE=str(record_path), **stamp) as w:
        info = w.api.ok("GET", "/info")
        assert info["worker"] == {"version": __version__, "revision": "b" * 40,
                                  "source": "https://example.com/comfyui-worker", "mode": "http"}
        assert info["build"]["built_at"] == "2026-01-31T12:00:00Z"
        assert info["labels"] == EXPECTED_LABELS


def test_the_dockerfile_sets_every_label_from_its_build_arg() -> None:
    """The Dockerfile's last LABEL instruction names each label with the build arg `make build` passes for it."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for key, arg in LABEL_ARGS.items():
        assert f'{key}="${{{arg}}}"' in text, key
    tail = text[text.rindex("\nLABEL "):]
    assert "\nRUN " not in tail and "\nCOPY " not in tail  # set last: no layer after the labels
