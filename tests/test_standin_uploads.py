"""Uploads, LoadImage and /view against b_upload_loadimage_invert.json (and the multipart cases of
x_edge_cases.json): naming rules (same bytes keep the name, different bytes get ``name (1).png``,
overwrite, subfolder, escapes), the mask upload, LoadImage -> ImageInvert -> SaveImage into a prefix
subfolder, and the pixels of the result."""

from __future__ import annotations

import io

import aiohttp
import pytest
from PIL import Image

from tests.helpers.standin import StandIn, TranscriptReplayer, load_transcript

pytestmark = pytest.mark.timeout(180)


def _png(size: tuple[int, int], color, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


# Bytes for the recorded uploads, in order. The fourth (overwrite) is what LoadImage later reads: the
# recording decoded the inverted result as 48x40 with pixel (245, 54, 195), i.e. a (10, 200, 60) source
# (ComfyUI inverts in float32 and truncates: 200 -> 54, 10 -> 245, 60 -> 195).
UPLOADS = [
    _png((48, 40), (1, 1, 1)),          # acc_upload.png
    _png((48, 40), (1, 1, 1)),          # same bytes again -> same name
    _png((48, 40), (2, 2, 2)),          # different bytes -> "acc_upload (1).png"
    _png((48, 40), (10, 200, 60)),      # overwrite=true -> replaced in place
    _png((48, 40), (3, 3, 3)),          # different again -> "acc_upload (2).png"
    _png((20, 10), (100, 0, 0)),        # accsub/acc_sub.png
    _png((4, 4), (0, 0, 0)),            # subfolder ../../etc -> 400
    _png((48, 40), (0, 0, 0, 0), "RGBA"),  # the mask upload
]


async def test_b_upload_session_matches_recording(comfy_factory) -> None:
    sd: StandIn = comfy_factory(use_extra_model_paths=False)
    replayer = TranscriptReplayer(sd, load_transcript("b_upload_loadimage_invert"),
                                  upload_bytes=lambda index, part: UPLOADS[index])
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the recorded server's counter stood at 2
            async with session.post(sd.url + "/prompt", json={}) as r:
                assert r.status == 400
        await replayer.run(session)
    problems = replayer.problems + replayer.ws_problems()
    assert not problems, "\n".join(problems)

    assert (sd.input_dir / "acc_upload.png").read_bytes() == UPLOADS[3]
    assert (sd.input_dir / "acc_upload (1).png").read_bytes() == UPLOADS[2]
    assert (sd.input_dir / "acc_upload (2).png").read_bytes() == UPLOADS[4]
    assert (sd.input_dir / "accsub" / "acc_sub.png").read_bytes() == UPLOADS[5]
    assert not (sd.input_dir.parent.parent / "etc").exists()
    note = next(e for e in load_transcript("b_upload_loadimage_invert") if e.get("text") == "decoded output image")
    with Image.open(sd.output_dir / "acc_b" / "inverted_00001_.png") as img:
        assert list(img.size) == note["size"] and img.mode == note["mode"]
        assert list(img.getpixel((0, 0))) == note["pixel_0_0"]
        assert sorted(img.text) == note["png_text_keys"]
    with Image.open(sd.output_dir / "acc_b" / "sub_00001_.png") as img:
        assert img.size == (20, 10) and img.getpixel((0, 0)) == (155, 255, 255)
    with Image.open(sd.input_dir / "clipspace" / "acc_mask.png") as img:
        assert img.mode == "RGBA" and img.getpixel((0, 0)) == (10, 200, 60, 0)


async def _upload(session, sd: StandIn, data: bytes | None, **fields) -> tuple[int, object]:
    form = aiohttp.FormData()
    if data is not None:
        form.add_field("image", data, filename=fields.pop("filename", "u.png"), content_type="image/png")
    for k, v in fields.items():
        form.add_field(k, v)
    async with session.post(sd.url + "/upload/image", data=form) as r:
        raw = await r.read()
        return r.status, (await r.json() if r.content_type == "application/json" else raw.decode())


async def test_upload_types_and_refusals(comfyui: StandIn) -> None:
    async with aiohttp.ClientSession() as s:
        assert await _upload(s, comfyui, _png((2, 2), 1), type="temp") == (
            200, {"name": "u.png", "subfolder": "", "type": "temp"})
        assert (comfyui.temp_dir / "u.png").is_file()
        assert await _upload(s, comfyui, _png((2, 2), 1), type="output", subfolder="a/b") == (
            200, {"name": "u.png", "subfolder": "a/b", "type": "output"})
        assert (comfyui.output_dir / "a" / "b" / "u.png").is_file()
        status, body = await _upload(s, comfyui, _png((2, 2), 1), type="models")
        assert (status, body) == (500, "500 Internal Server Error\n\nServer got itself in trouble")
        assert (await _upload(s, comfyui, _png((2, 2), 1), filename=""))[0] == 500  # a str part: no .file
        assert (await _upload(s, comfyui, None, subfolder="x"))[0] == 400
        assert (await _upload(s, comfyui, _png((2, 2), 1), subfolder="/etc"))[0] == 400
        # an uploaded name shows up in LoadImage's combo (top level only)
        async with s.get(comfyui.url + "/object_info/LoadImage") as r:
            assert (await r.json())["LoadImage"]["input"]["required"]["image"][0] == []
        await _upload(s, comfyui, _png((2, 2), 2), filename="z.png")
        await _upload(s, comfyui, b"not an image", filename="notes.txt")
        async with s.get(comfyui.url + "/object_info/LoadImage") as r:
            assert (await r.json())["LoadImage"]["input"]["required"]["image"][0] == ["z.png"]


async def test_view_rules(comfyui: StandIn) -> None:
    (comfyui.output_dir / "sub").mkdir()
    Image.new("RGBA", (3, 2), (1, 2, 3, 128)).save(comfyui.output_dir / "sub" / "a.png")
    (comfyui.output_dir / "page.html").write_text("<html>")
    async with aiohttp.ClientSession() as s:
        async def get(**params):
            async with s.get(comfyui.url + "/view", params=params) as r:
                return r.status, r.headers.get("Content-Type"), await r.read(), r.headers

        status, ctype, body, headers = await get(filename="a.png", subfolder="sub")
        assert (status, ctype) == (200, "image/png") and headers["Content-Disposition"] == 'filename="a.png"'
        assert body == (comfyui.output_dir / "sub" / "a.png").read_bytes()
        assert (await get(filename="sub/a.png [output]"))[0] == 404  # basename only after the subfolder join
        assert (await get(filename="a.png [output]", subfolder="sub"))[0] == 200
        assert (await get(filename=" [output]"))[0] == 400  # nothing left after the annotation
        assert (await get(filename="/etc/passwd"))[0] == 400
        assert (await get(filename="a..png"))[0] == 400
        assert (await get(filename="a.png", type="bogus"))[0] == 400
        assert (await get(filename="a.png", subfolder="../.."))[0] == 403
        assert (await get(filename="missing.png"))[0] == 404
        assert (await get())[0] == 404
        assert (await get(filename="page.html"))[1] == "application/octet-stream"
        status, ctype, body, _ = await get(filename="a.png", subfolder="sub", channel="a")
        with Image.open(io.BytesIO(body)) as img:
            assert ctype == "image/png" and img.mode == "RGBA" and img.getpixel((0, 0))[3] == 128
        status, ctype, body, _ = await get(filename="a.png", subfolder="sub", channel="rgb")
        with Image.open(io.BytesIO(body)) as img:
            assert img.mode == "RGB" and img.getpixel((0, 0)) == (1, 2, 3)
        status, ctype, body, _ = await get(filename="a.png", subfolder="sub", preview="jpeg;50")
        assert ctype == "image/jpeg" and body[:2] == b"\xff\xd8"
        status, ctype, body, _ = await get(filename="a.png", subfolder="sub", preview="png")
        assert ctype == "image/webp" and body[:4] == b"RIFF"
