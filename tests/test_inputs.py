"""Input images: names, strict base64, content verification, size caps, URLs through the guard."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from supervisor.config import Settings
from supervisor.errors import InvalidInputError
from supervisor.jobs.image_checks import decode_base64, validate_name, verify_image
from supervisor.jobs.inputs import resolve_inputs
from supervisor.jobs.netguard import GuardedFetcher
from supervisor.jobs.request import parse_request
from tests.helpers.jobs import b64, loopback_server, png_bytes, redirect, static

SETTINGS = Settings(max_input_bytes=64 * 1024)
MAX_PIXELS = SETTINGS.max_input_pixels
SAVE = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}


def workflow(image_value: str = "a.png") -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image_value}}, "2": SAVE}


async def resolve(raw: dict[str, Any], settings: Settings = SETTINGS, allow: tuple[str, ...] = ()):
    req = parse_request(raw, settings)
    fetcher = GuardedFetcher(allow or settings.url_input_allowlist, timeout_s=5)
    try:
        return await resolve_inputs(req, settings, fetcher)
    finally:
        await fetcher.close()


async def problem(raw: dict[str, Any], settings: Settings = SETTINGS, allow: tuple[str, ...] = ()) -> str:
    with pytest.raises(InvalidInputError) as info:
        await resolve(raw, settings, allow)
    assert info.value.message.startswith("Failed to upload one or more input images: ")
    return info.value.message.removeprefix("Failed to upload one or more input images: ")


@pytest.mark.parametrize("name", ["a.png", "Photo 1.JPG", "x.jpeg", "x.webp", "фото.png", "a-b_c.tiff"])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name, reason",
    [
        ("../../etc/passwd", "must be a plain file name (no '/', '\\' or '..')"),
        ("sub/a.png", "must be a plain file name (no '/', '\\' or '..')"),
        ("sub\\a.png", "must be a plain file name (no '/', '\\' or '..')"),
        ("a..png", "must be a plain file name (no '/', '\\' or '..')"),
        ("a\x00.png", "must not contain a NUL character"),
        ("a\n.png", "must not contain control characters"),
        (".hidden.png", "must not start with '.'"),
        ("a.exe", "must end with an image extension (.png, .jpg, .jpeg, .webp, .gif, .bmp, .tif, .tiff)"),
        ("x" * 300 + ".png", "is longer than 255 bytes"),
        ("", "is empty"),
    ],
)
def test_bad_names(name: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_name(name)
    assert str(info.value) == reason


def test_decode_base64_is_strict_and_says_why() -> None:
    data = png_bytes()
    assert decode_base64(b64(data), 10**6) == data
    assert decode_base64("data:image/png;base64," + b64(data), 10**6) == data
    wrapped = "\n".join(b64(data)[i:i + 76] for i in range(0, len(b64(data)), 76))
    assert decode_base64(wrapped, 10**6) == data  # MIME line breaks are fine
    cases = {
        "iVBO*RW0KGgo=": "is not valid base64: invalid character '*' at position 4",
        "iVBORw0KGgo": "is not valid base64: its length 11 is not a multiple of 4 (truncated, or '=' padding missing)",
        "data:image/png,abc": "is a data URI that is not base64 (it must start like data:image/png;base64,)",
        "data:image/png;base64": "is a data URI without a ',' before the data",
        "data:image/png;base64,": "has no base64 data",
        "AAAA" * 100: "is 300 bytes decoded, over the 100 bytes limit (MAX_INPUT_BYTES)",
    }
    for text, reason in cases.items():
        with pytest.raises(ValueError) as info:
            decode_base64(text, 100)
        assert str(info.value) == reason, text


def test_verify_image() -> None:
    assert verify_image(png_bytes(), MAX_PIXELS) == "PNG"
    assert verify_image(png_bytes(fmt="JPEG"), MAX_PIXELS) == "JPEG"
    assert verify_image(png_bytes(fmt="WEBP"), MAX_PIXELS) == "WEBP"
    for data, reason in [
        (b"hello world, not an image", "is not an image (it is text)"),
        (b"<!DOCTYPE html><html></html>", "is not an image (it is an HTML page)"),
        (b"\x00\x01\x02\x03\xff\xfe" * 10, "is not an image (its first bytes are 00010203fffe0001)"),
        (b"", "is empty"),
    ]:
        with pytest.raises(ValueError) as info:
            verify_image(data, MAX_PIXELS)
        assert str(info.value) == reason
    truncated = png_bytes(size=(64, 64))[:-30]
    with pytest.raises(ValueError) as info:
        verify_image(truncated, MAX_PIXELS)
    assert str(info.value).startswith("is a damaged image: ")
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    with pytest.raises(ValueError) as info:
        verify_image(ico.getvalue(), MAX_PIXELS)
    assert str(info.value) == "is a ICO image; accepted: PNG, JPEG, WEBP, GIF, BMP, TIFF"


async def test_supplied_images_resolve_in_order() -> None:
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255), fmt="JPEG")
    resolved = await resolve({"workflow": workflow(), "images": [
        {"name": "a.png", "image": b64(red)}, {"name": "b.jpg", "image": "data:image/jpeg;base64," + b64(blue)}]})
    assert [(f.name, f.data, f.format) for f in resolved.files] == [("a.png", red, "PNG"), ("b.jpg", blue, "JPEG")]
    assert resolved.inline == {}


async def test_every_bad_image_is_named_with_its_reason() -> None:
    big = png_bytes(size=(2, 2)) + b"\x00" * (70 * 1024)
    message = await problem({"workflow": workflow(), "images": [
        {"name": "ok.png", "image": b64(png_bytes())},
        {"name": "bad.png", "image": "iVBO*RW0KGgo="},
        {"name": "text.png", "image": b64(b"just some text, not an image at all")},
        {"name": "big.png", "image": b64(big)},
    ]})
    assert message == (
        "3 problems: images[1] 'bad.png' is not valid base64: invalid character '*' at position 4; "
        "images[2] 'text.png' is not an image (it is text); "
        f"images[3] 'big.png' is {len(big)} bytes decoded, over the 65536 bytes limit (MAX_INPUT_BYTES)"
    )


async def test_inline_base64_in_load_image_is_an_image_or_a_name() -> None:
    face = png_bytes((10, 200, 10), fmt="JPEG")
    resolved = await resolve(workflow(b64(face)))
    assert resolved.inline == {("1", "image"): "node1_image.jpg"}
    assert [(f.name, f.data, f.origin) for f in resolved.files] == [("node1_image.jpg", face, "node 1 input image")]
    # a short string that happens to be valid base64 but is not an image is a file name
    name_like = "91771d9aa876d0d6f931ca1ab14b8a30"
    assert (await resolve(workflow(name_like))).files == []


async def test_long_inline_base64_that_is_not_an_image_is_refused() -> None:
    garbage = b64(b"\x01\x02\x03" * 200)
    assert await problem(workflow(garbage)) == "node 1 input image is not an image (its first bytes are 0102030102030102)"
    assert await problem(workflow("data:image/png;base64,AAAA")) == (
        "node 1 input image is not an image (its first bytes are 000000)"
    )


async def test_url_inputs_disabled() -> None:
    settings = SETTINGS.replace(allow_url_inputs=False)
    assert await problem({"workflow": workflow(), "images": [{"name": "a.png", "image": "https://example.com/a.png"}]},
                         settings) == (
        "images[0] 'a.png' https://example.com/a.png refused: URL inputs are disabled on this worker "
        "(ALLOW_URL_INPUTS=false)"
    )


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1:8188/view?filename=x.png", "http://127.0.0.1:8188/view?... refused: 127.0.0.1 is a loopback address"),
        ("http://10.0.0.1/a.png", "http://10.0.0.1/a.png refused: 10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "http://169.254.169.254/latest/meta-data/ refused: 169.254.169.254 is a cloud metadata address"),
        ("http://[::1]/a.png", "http://[::1]/a.png refused: ::1 is a loopback address"),
    ],
)
async def test_refused_urls_in_images_and_in_nodes(url: str, reason: str) -> None:
    assert await problem({"workflow": workflow(), "images": [{"name": "a.png", "image": url}]}) == f"images[0] 'a.png' {reason}"
    assert await problem(workflow(url)) == f"node 1 input image {reason}"


async def test_url_images_are_downloaded_and_verified() -> None:
    img = png_bytes((1, 2, 3))
    async with loopback_server({"/a.png": static(img, "image/png"), "/page": static(b"<html></html>", "text/html"),
                                "/r": redirect("http://169.254.169.254/")}) as srv:
        allow = ("localhost",)
        resolved = await resolve({"workflow": workflow(), "images": [
            {"name": "a.png", "image": srv.url("/a.png", host="localhost")}]}, allow=allow)
        assert resolved.files[0].data == img
        resolved = await resolve(workflow(srv.url("/a.png", host="localhost")), allow=allow)
        assert resolved.inline == {("1", "image"): "node1_image.png"} and resolved.files[0].data == img
        assert await problem({"workflow": workflow(), "images": [
            {"name": "a.png", "image": srv.url("/page", host="localhost")}]}, allow=allow) == (
            "images[0] 'a.png' is not an image (it is an HTML page)")
        assert await problem(workflow(srv.url("/r", host="localhost")), allow=allow) == (
            "node 1 input image http://169.254.169.254/ refused: 169.254.169.254 is a cloud metadata address")
