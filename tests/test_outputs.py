"""Output collection on real files: order, every media kind, path safety, re-encoding, size estimate."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from supervisor.config import Settings
from supervisor.jobs.inputs import comfy_dirs
from supervisor.jobs.outputs import (
    JobOutput,
    OutputRef,
    collect_refs,
    encode,
    load_files,
    media_type,
    merge_ui_outputs,
    serialised_size,
)
from tests.helpers.jobs import png_bytes

GRAPH = {"9": {"class_type": "SaveImage"}, "3": {"class_type": "VHS_VideoCombine"}, "5": {"class_type": "SaveAudio"},
         "7": {"class_type": "PreviewImage"}}


def ui() -> dict:
    return {
        "5": {"audio": [{"filename": "a_00001_.flac", "subfolder": "job", "type": "output"}]},
        "7": {"images": [{"filename": "p_00001_.png", "subfolder": "", "type": "temp"}]},
        "9": {"images": [{"filename": "s_00001_.png", "subfolder": "job", "type": "output"},
                         {"filename": "s_00002_.png", "subfolder": "job", "type": "output"}],
              "animated": [False]},
        "3": {"gifs": [{"filename": "v_00001.mp4", "subfolder": "job", "type": "output", "format": "video/h264-mp4"}],
              "text": ["not a file"]},
        "99": {"images": [{"filename": "x.png", "subfolder": "", "type": "input"}]},
    }


def test_refs_follow_workflow_order_then_batch_index_and_skip_non_files() -> None:
    refs = collect_refs(ui(), GRAPH, cached_nodes=["7"])
    assert [(r.node_id, r.class_type, r.filename, r.type, r.key, r.index, r.cached) for r in refs] == [
        ("9", "SaveImage", "s_00001_.png", "output", "images", 0, False),
        ("9", "SaveImage", "s_00002_.png", "output", "images", 1, False),
        ("3", "VHS_VideoCombine", "v_00001.mp4", "output", "gifs", 0, False),
        ("5", "SaveAudio", "a_00001_.flac", "output", "audio", 0, False),
        ("7", "PreviewImage", "p_00001_.png", "temp", "images", 0, True),
    ]


def test_duplicates_are_listed_once_and_history_wins_over_events() -> None:
    executed = {"9": {"images": [{"filename": "old.png", "subfolder": "", "type": "output"}]},
                "4": {"images": [{"filename": "e.png", "subfolder": "", "type": "output"}]}}
    merged = merge_ui_outputs({"9": {"images": [{"filename": "s.png", "subfolder": "", "type": "output"}] * 2}},
                              executed)
    assert [r.filename for r in collect_refs(merged, GRAPH)] == ["s.png", "e.png"]


@pytest.mark.parametrize(
    "name, expected",
    [("a.png", "image/png"), ("a.JPG", "image/jpeg"), ("a.webp", "image/webp"), ("a.gif", "image/gif"),
     ("a.mp4", "video/mp4"), ("a.webm", "video/webm"), ("a.flac", "audio/flac"), ("a.mp3", "audio/mpeg"),
     ("a.wav", "audio/wav"), ("a.latent", "application/octet-stream"), ("a.unknownext", "application/octet-stream")],
)
def test_media_types(name: str, expected: str) -> None:
    assert media_type(name) == expected


def test_reported_paths_never_leave_comfyuis_folders(tmp_path: Path) -> None:
    dirs = comfy_dirs(Settings(data_dir=tmp_path))
    ok = OutputRef("1", "SaveImage", "a.png", "job", "output", "images", 0, False)
    assert ok.path(dirs) == (tmp_path / "output" / "job" / "a.png").resolve()
    for filename, subfolder, ftype in [("../../etc/passwd", "", "output"), ("passwd", "../../etc", "output"),
                                       ("a.png", "", "input"), ("", "", "output"), ("a\x00.png", "", "output")]:
        assert OutputRef("1", "X", filename, subfolder, ftype, "images", 0, False).path(dirs) is None


async def test_files_are_read_converted_and_missing_ones_warned(tmp_path: Path) -> None:
    dirs = comfy_dirs(Settings(data_dir=tmp_path))
    (dirs.output / "job").mkdir(parents=True)
    (dirs.temp).mkdir(parents=True)
    rgba = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(rgba, format="PNG")
    (dirs.output / "job" / "s_00001_.png").write_bytes(rgba.getvalue())
    frames = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(frames, format="WEBP", save_all=True,
                                         append_images=[Image.new("RGB", (4, 4), "blue")])
    (dirs.output / "job" / "anim_00001_.webp").write_bytes(frames.getvalue())
    (dirs.output / "job" / "v.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (dirs.temp / "p_00001_.png").write_bytes(png_bytes())
    ui_out = {
        "1": {"images": [{"filename": "s_00001_.png", "subfolder": "job", "type": "output"},
                         {"filename": "gone_00002_.png", "subfolder": "job", "type": "output"}]},
        "2": {"images": [{"filename": "anim_00001_.webp", "subfolder": "job", "type": "output"}], "animated": [True]},
        "3": {"gifs": [{"filename": "v.mp4", "subfolder": "job", "type": "output"}]},
        "4": {"images": [{"filename": "p_00001_.png", "subfolder": "", "type": "temp"},
                         {"filename": "p_00000_.png", "subfolder": "", "type": "temp"}]},
    }
    graph = {"1": {"class_type": "SaveImage"}, "2": {"class_type": "SaveAnimatedWEBP"},
             "3": {"class_type": "VHS_VideoCombine"}, "4": {"class_type": "PreviewImage"}}
    refs = collect_refs(ui_out, graph, cached_nodes=["4"])
    files, warnings = await load_files(refs, dirs, include_temp=True, image_format="jpeg", quality=80, graph=graph)
    assert [(f.filename, f.media_type, f.ref.node_id) for f in files] == [
        ("s_00001_.jpg", "image/jpeg", "1"), ("anim_00001_.webp", "image/webp", "2"), ("v.mp4", "video/mp4", "3"),
        ("p_00001_.jpg", "image/jpeg", "4")]
    assert Image.open(io.BytesIO(files[0].data)).format == "JPEG"
    assert files[1].data == frames.getvalue()  # animations are left as they are
    assert warnings == [
        "node 1 (SaveImage): reported file 'gone_00002_.png' does not exist; skipped",
        "node 4 (PreviewImage): reported file 'p_00000_.png' does not exist (ComfyUI replayed it from its cache "
        "after the file was deleted); skipped",
    ]
    plain, _ = await load_files(refs, dirs, include_temp=False, image_format="png", quality=80, graph=graph)
    assert [f.filename for f in plain] == ["s_00001_.png", "anim_00001_.webp", "v.mp4"]
    assert plain[0].data == rgba.getvalue()


async def test_serialised_size_is_an_upper_bound_of_the_real_json(tmp_path: Path) -> None:
    dirs = comfy_dirs(Settings(data_dir=tmp_path))
    dirs.output.mkdir(parents=True)
    for i, size in enumerate((1, 2, 3, 1000, 4096)):
        (dirs.output / f"f{i}.bin").write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    ui_out = {"1": {"files": [{"filename": f"f{i}.bin", "subfolder": "", "type": "output"} for i in range(5)]}}
    files, _ = await load_files(collect_refs(ui_out, {"1": {"class_type": "X"}}), dirs, include_temp=False,
                                image_format="png", quality=90, graph={})
    warnings = ["a warning with \"quotes\""]
    outputs = [JobOutput(f.filename, f.ref.node_id, f.media_type, len(f.data), encode(f.data), "base64").to_dict()
               for f in files]
    real = len(json.dumps({"outputs": outputs, "errors": warnings, "timings": {"total_s": 1.0}}))
    assert real <= serialised_size(files, warnings) <= real + 2048
    assert base64.b64decode(outputs[3]["data"]) == files[3].data
