"""Every file a job makes ComfyUI write is the job's own, and gone on every ending (issue 15, item 1).

Found by attacking the worker: a job cancelled after its PreviewImage ran left ``temp/ComfyUI_temp_<random>_...``
behind, and another job, having learnt the naming pattern from its own preview, loaded it with
``LoadImage "ComfyUI_temp_<random>_00001_.png [temp]"``. Here every ending (success, failure, cancel, deadline
with and without a restart) leaves ComfyUI's input, output and temp folders empty, and no job can name a file
of another job: previews and outputs (``[temp]``, ``[output]``) or another job's upload folder.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from supervisor.errors import ExecutionError, JobTimeoutError, ValidationError
from tests.helpers.comfy_targets import ComfyTarget
from tests.helpers.jobs import Rig, b64, png_bytes, supervisor_rig
from tests.test_jobs_faults import run, wait_until

GRACE_S = 1.0


def previewed(prefix: str) -> dict[str, Any]:
    """A preview (temp/) and a saved image (output/), then the 4 s node, then another saved image."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x10}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
            "4": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}},
            "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix + "_blur"}}}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    with supervisor_rig(tmp_path_factory.mktemp("private"), STANDIN_NODE_FAULT="ImageBlur:sleep:4,ImageScale:error:boom",
                        INTERRUPT_GRACE_S=str(GRACE_S)) as r:
        yield r


async def _files_gone(rig: Rig) -> None:
    await wait_until(lambda: not rig.job_files(), timeout=10, what=f"no job file left (left: {rig.job_files()})")


async def _until_running(rig: Rig, node: str = "4") -> None:
    """Until the stand-in runs the slow node (so the preview and the first save have been written)."""
    await wait_until(lambda: any(p.name.startswith("ComfyUI_temp_") for p in rig.job_files()), what="the preview")
    await asyncio.sleep(0.3)


async def test_a_cancelled_job_leaves_no_preview_or_output(rig: Rig) -> None:
    engine = rig.engine()
    try:
        job = asyncio.ensure_future(run(engine, {"workflow": previewed("cancelled"), "timeout_s": 60}, "cancelled"))
        await _until_running(rig)
        assert {p.parent.name for p in rig.job_files()} >= {"temp"}
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        await _files_gone(rig)
    finally:
        await engine.close()


async def test_a_timed_out_job_leaves_nothing_after_comfyui_was_restarted(rig: Rig) -> None:
    engine = rig.engine()
    try:
        with pytest.raises(JobTimeoutError) as info:
            await run(engine, {"workflow": previewed("late"), "timeout_s": 2}, "late")
        assert "so it was restarted" in info.value.message, info.value.message
        await _files_gone(rig)
    finally:
        await engine.close()


async def test_a_failed_and_a_successful_job_leave_nothing(rig: Rig) -> None:
    engine = rig.engine()
    try:
        graph = previewed("ok")
        graph["4"]["class_type"] = "ImageInvert"
        graph["4"]["inputs"] = {"image": ["1", 0]}
        result = await run(engine, {"workflow": graph, "timeout_s": 30, "include_temp": True}, "ok")
        assert [o.type for o in result.outputs] == ["temp", "output", "output"]
        await _files_gone(rig)
        graph["4"] = {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                             "width": 8, "height": 8, "crop": "disabled"}}
        graph["1"]["inputs"]["color"] = 0x20  # not from the cache
        with pytest.raises(ExecutionError) as info:  # after the preview and the first image were written
            await run(engine, {"workflow": graph, "timeout_s": 30}, "failed")
        assert "raised Exception: boom" in info.value.message, info.value.message
        await _files_gone(rig)
    finally:
        await engine.close()


def loader(value: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": value}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "loaded"}}}


@pytest.mark.parametrize("value", [
    "ComfyUI_temp_abcde_00001_.png [temp]",
    "job-victim-1234abcd/ComfyUI_00001_.png [output]",
    "job-victim-1234abcd/face.png",
    "job-victim-1234abcd/face.png [input]",
    "../temp/ComfyUI_temp_abcde_00001_.png",
])
async def test_no_job_can_name_another_jobs_file(rig: Rig, value: str) -> None:
    """Even when the file is there (written by the victim), the job is refused before ComfyUI hears of it."""
    data = rig.settings.data_dir
    for path in (data / "temp" / "ComfyUI_temp_abcde_00001_.png", data / "output" / "job-victim-1234abcd" /
                 "ComfyUI_00001_.png", data / "input" / "job-victim-1234abcd" / "face.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes())
    engine = rig.engine()
    try:
        with pytest.raises(ValidationError) as info:
            await run(engine, {"workflow": loader(value), "timeout_s": 30}, "thief")
        assert info.value.message.startswith("Workflow validation failed: node 1 (LoadImage) input image: "), \
            info.value.message
        assert ("a job can load only the images it supplies and the files installed in ComfyUI's input folder"
                in info.value.message or "not in ComfyUI's input folder" in info.value.message), info.value.message
    finally:
        await engine.close()
        for sub in ("temp", "output", "input"):
            for path in (data / sub).rglob("*"):
                if path.is_file():
                    path.unlink()


async def test_a_job_still_loads_its_own_images_and_installed_inputs(rig: Rig) -> None:
    (rig.settings.data_dir / "input" / "installed.png").write_bytes(png_bytes())
    engine = rig.engine()
    try:
        graph = loader("face.png")
        result = await run(engine, {"workflow": graph, "images": [{"name": "face.png", "image": b64(png_bytes())}]})
        assert len(result.outputs) == 1
        result = await run(engine, {"workflow": loader("installed.png")})
        assert len(result.outputs) == 1
    finally:
        await engine.close()
        (rig.settings.data_dir / "input" / "installed.png").unlink()
    await _files_gone(rig)


async def test_a_cancel_after_a_preview_leaves_nothing_on_both_comfyuis(tmp_path, comfy: ComfyTarget) -> None:
    """The issue's case on the real ComfyUI too: a job cancelled after its PreviewImage ran, while a long node
    (a wide ImageBlur; the stand-in's sleep fault) holds the prompt, leaves no file in input, output or temp."""
    with supervisor_rig(tmp_path, target=comfy, STANDIN_NODE_FAULT="ImageBlur:sleep:7",
                        INTERRUPT_GRACE_S=str(GRACE_S)) as rig:
        engine = rig.engine()
        try:
            graph = previewed("victim")
            graph["1"]["inputs"].update(width=512, height=512, batch_size=12)
            graph["4"]["inputs"].update(blur_radius=31, sigma=10.0)
            job = asyncio.ensure_future(run(engine, {"workflow": graph, "timeout_s": 120}, "victim"))
            await _until_running(rig)
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job
            await wait_until(lambda: not rig.job_files(), timeout=comfy.start_timeout_s,
                             what="no job file left")
        finally:
            await engine.close()
