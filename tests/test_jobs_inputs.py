"""Bad inputs through the whole engine: each a clear error, and ComfyUI never hears of the job.

"Never hears" is read off the stand-in's own request log: while such a job runs, the only requests it
receives are the supervisor's liveness probes (``GET /system_stats``).
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from supervisor.errors import InvalidInputError, JobError
from tests.helpers.jobs import Rig, b64, loopback_server, png_bytes, redirect, static, supervisor_rig

PROBES = {("GET", "/system_stats")}
GRAPH = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
         "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
         "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}}}
PREFIX = "Failed to upload one or more input images: "


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    with supervisor_rig(tmp_path_factory.mktemp("inputs"), MAX_INPUT_BYTES=str(50 * 1024),
                        URL_INPUT_ALLOWLIST="localhost") as r:
        yield r


def with_image(source: str, name: str = "in.png") -> dict[str, Any]:
    return {"workflow": GRAPH, "images": [{"name": name, "image": source}]}


def inline(source: str) -> dict[str, Any]:
    graph = {**GRAPH, "1": {"class_type": "LoadImage", "inputs": {"image": source}}}
    return {"workflow": graph}


async def refused(rig: Rig, body: dict[str, Any]) -> str:
    before = len(rig.requests())
    engine = rig.engine()
    try:
        with pytest.raises(JobError) as info:
            await engine.run_job("bad", body)
    finally:
        await engine.close()
    reached = [(r["method"], r["path"]) for r in rig.requests()[before:]]
    assert set(reached) <= PROBES, reached
    assert isinstance(info.value, InvalidInputError)
    assert rig.job_files() == []
    assert info.value.message.startswith(PREFIX)
    return info.value.message.removeprefix(PREFIX)


BIG = png_bytes(size=(2, 2)) + b"\0" * (60 * 1024)


@pytest.mark.parametrize(
    "body, problem",
    [
        (with_image("iVBORw0KGgo*AAAANSUhEUg=="), "images[0] 'in.png' is not valid base64: invalid character '*' at position 11"),
        (with_image("iVBORw0KGgoAAAANSUhEU"), "images[0] 'in.png' is not valid base64: its length 21 is not a multiple of 4 (truncated, or '=' padding missing)"),
        (with_image(b64(b"%PDF-1.4 not an image at all")), "images[0] 'in.png' is not an image (it is text)"),
        (with_image(b64(BIG)), f"images[0] 'in.png' is {len(BIG)} bytes decoded, over the 51200 bytes limit (MAX_INPUT_BYTES)"),
        (with_image(b64(png_bytes()), name="../../etc/passwd"), "images[0] name '../../etc/passwd' must be a plain file name (no '/', '\\' or '..')"),
        (with_image("http://127.0.0.1:8188/view?filename=x.png"), "images[0] 'in.png' http://127.0.0.1:8188/view?... refused: 127.0.0.1 is a loopback address"),
        (with_image("http://10.0.0.1/in.png"), "images[0] 'in.png' http://10.0.0.1/in.png refused: 10.0.0.1 is a private address"),
        (with_image("http://169.254.169.254/latest/meta-data/iam/"), "images[0] 'in.png' http://169.254.169.254/latest/meta-data/iam/ refused: 169.254.169.254 is a cloud metadata address"),
        (with_image("http://[::1]:8188/in.png"), "images[0] 'in.png' http://[::1]:8188/in.png refused: ::1 is a loopback address"),
        (inline("http://169.254.169.254/latest/meta-data/"), "node 1 input image http://169.254.169.254/latest/meta-data/ refused: 169.254.169.254 is a cloud metadata address"),
        (inline("data:image/png;base64," + b64(b"<html>nope</html>")), "node 1 input image is not an image (it is an HTML page)"),
    ],
)
async def test_bad_inputs_are_refused_before_comfyui(rig: Rig, body: dict[str, Any], problem: str) -> None:
    assert await refused(rig, body) == problem


async def test_allowlisted_server_redirecting_to_a_refused_address(rig: Rig) -> None:
    async with loopback_server({"/in.png": redirect("http://169.254.169.254/latest/meta-data/")}) as srv:
        problem = await refused(rig, with_image(srv.url("/in.png", host="localhost")))
        assert srv.hits == ["/in.png"]
    assert problem == ("images[0] 'in.png' http://169.254.169.254/latest/meta-data/ refused: 169.254.169.254 is a "
                       "cloud metadata address")


async def test_allowlisted_url_image_is_used_and_its_bytes_matter(rig: Rig) -> None:
    dark, light = png_bytes((10, 10, 10)), png_bytes((240, 240, 240))
    async with loopback_server({"/dark.png": static(dark, "image/png"), "/light.png": static(light, "image/png")}) as srv:
        engine = rig.engine()
        try:
            a = await engine.run_job("url-a", with_image(srv.url("/dark.png", host="localhost")))
            b = await engine.run_job("url-b", inline(srv.url("/light.png", host="localhost")))
        finally:
            await engine.close()
    assert [o.filename for o in a.outputs] == [o.filename for o in b.outputs] == ["inv_00001_.png"]
    assert a.outputs[0].data != b.outputs[0].data
    assert rig.job_files() == []


async def test_url_inputs_can_be_turned_off(rig: Rig) -> None:
    engine = rig.engine(allow_url_inputs=False)
    try:
        with pytest.raises(InvalidInputError) as info:
            await engine.run_job("off", with_image("https://example.com/in.png"))
    finally:
        await engine.close()
    assert info.value.message == (PREFIX + "images[0] 'in.png' https://example.com/in.png refused: URL inputs are "
                                  "disabled on this worker (ALLOW_URL_INPUTS=false)")


async def test_every_supplied_name_is_rewritten_and_uploaded_into_the_job_folder(rig: Rig) -> None:
    before = len(rig.requests())
    engine = rig.engine()
    try:
        result = await engine.run_job("names", with_image("data:image/png;base64," + b64(png_bytes((1, 2, 3)))))
    finally:
        await engine.close()
    uploads = [r for r in rig.requests()[before:] if r["path"] == "/upload/image"]
    assert len(uploads) == 1
    prompt = [r for r in rig.requests()[before:] if r["path"] == "/prompt"]
    assert len(prompt) == 1
    assert [o.filename for o in result.outputs] == ["inv_00001_.png"]
    assert rig.job_files() == []


ECHO_PACK = '''
import os
import folder_paths


class StringImageEcho:
    """Takes image data as a STRING (decodes it itself, like base64-loader packs) and writes it to a file."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("STRING", {"multiline": True}),
                             "filename_prefix": ("STRING", {"default": "echo"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "test"

    def run(self, image, filename_prefix):
        out = folder_paths.get_output_directory()
        full, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out)
        os.makedirs(full, exist_ok=True)
        fname = f"{name}_{counter:05}_.txt"
        with open(os.path.join(full, fname), "w") as f:
            f.write(image)
        return {"ui": {"text_files": [{"filename": fname, "subfolder": subfolder, "type": "output"}]}}


NODE_CLASS_MAPPINGS = {"StringImageEcho": StringImageEcho}
'''


async def test_image_inputs_a_node_declares_as_string_keep_their_base64(tmp_path) -> None:
    pack = tmp_path / "packs" / "echo_pack"
    pack.mkdir(parents=True)
    (pack / "__init__.py").write_text(ECHO_PACK)
    yaml = tmp_path / "packs.yaml"
    yaml.write_text(f"test_packs:\n  custom_nodes: {pack.parent}\n")
    data = b64(png_bytes((5, 6, 7)))
    with supervisor_rig(tmp_path / "w", COMFYUI_ARGS=f"--cpu --extra-model-paths-config {yaml}") as rig:
        before = len(rig.requests())
        engine = rig.engine()
        try:
            result = await engine.run_job("echo", {"workflow": {
                "1": {"class_type": "StringImageEcho", "inputs": {"image": data, "filename_prefix": "echo"}}}})
        finally:
            await engine.close()
        assert [r["path"] for r in rig.requests()[before:] if r["path"] == "/upload/image"] == []
        assert rig.job_files() == []
    assert [(o.filename, o.media_type, o.node_id) for o in result.outputs] == [("echo_00001_.txt", "text/plain", "1")]
    assert base64.b64decode(result.outputs[0].data).decode() == data
