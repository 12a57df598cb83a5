"""The self-hosted API attacked as a hostile client would: every answer a 4xx JSON error, never a 500, a hang or a leak.

One worker (a real ``python -m supervisor`` process, the stand-in ComfyUI behind it, ``API_KEY`` set, short
``HEADER_TIMEOUT_S``/``BODY_TIMEOUT_S`` and a small ``MAX_CONNECTIONS``) takes the attacks of issue 14, each over
a real socket (tests/helpers/rawhttp.py sends what HTTP libraries refuse to). Each test reproduces one defect the
issue lists and checks the intended answer. 1100 slow clients under a 1024 open-file limit:
tests/test_http_slow_clients.py; thousands of generated requests: tests/test_http_fuzz.py.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers.api import ROOT, ApiWorker, api_worker, write_models
from tests.helpers.jobs import png_bytes
from tests.helpers.rawhttp import RawResponse, exchange, request_bytes
from tests.helpers.worker import wait_for

pytestmark = pytest.mark.timeout(180)

KEY = "hardening-key-0123456789abcdef"
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 16
NAMED_MODELS = {
    "checkpoints": ["sd_xl_base_1.0.safetensors"],
    "ipadapter": ["ip-adapter-plus-face_sdxl_vit-h.safetensors"],
    "clip_vision": ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"],
}
INVERT = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
          "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
          "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}}}


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiWorker]:
    root = tmp_path_factory.mktemp("hardening")
    write_models(root / "models", NAMED_MODELS)
    shutil.copytree(ROOT / "workflows", root / "workflows")
    with api_worker(root, API_KEY=KEY, WORKFLOWS_DIR=str(root / "workflows"), HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
                    BODY_TIMEOUT_S=str(BODY_TIMEOUT_S), MAX_CONNECTIONS=str(MAX_CONNECTIONS),
                    URL_INPUT_ALLOWLIST="127.0.0.1", STANDIN_REQUEST_LOG=str(root / "comfy-requests.jsonl")) as worker:
        yield worker


def send(w: ApiWorker, data: bytes, timeout: float = 10.0) -> RawResponse:
    return exchange(w.port, data, timeout)


def refused(w: ApiWorker, data: bytes, status: int | tuple[int, ...] = 400) -> str:
    """Send ``data``; assert the documented JSON error with ``status``; the error text."""
    resp = send(w, data)
    expected = status if isinstance(status, tuple) else (status,)
    assert resp.status in expected, (resp.status, resp.raw[:600])
    assert resp.is_json_error, resp.raw[:600]
    return resp.json()["error"]


def post_json(method: str, path: str, body: str | bytes, key: str | None = KEY,
              headers: list[tuple[str, bytes | str]] | None = None) -> bytes:
    raw = body.encode() if isinstance(body, str) else body
    return request_bytes(method, path, raw, [("Content-Type", "application/json"), *(headers or [])], key=key)


# --- 5. the HTTP parser's own refusals: JSON, not plain text ------------------------------------------------


@pytest.mark.parametrize("name, data", [
    ("bad method", b"GE(T /health HTTP/1.1\r\nHost: w\r\n\r\n"),
    ("bad character in the path", b"GET /health\x01 HTTP/1.1\r\nHost: w\r\n\r\n"),
    ("Content-Length with Transfer-Encoding",
     b"POST /run HTTP/1.1\r\nHost: w\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two Content-Lengths", b"POST /run HTTP/1.1\r\nHost: w\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n12345"),
    ("request line over 8190 bytes", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: w\r\n\r\n"),
    ("header over 8190 bytes", b"GET /health HTTP/1.1\r\nHost: w\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n"),
    ("control character in a header value", b"GET /health HTTP/1.1\r\nHost: w\r\nX-A: 1\x002\r\n\r\n"),
    ("bad chunked body", b"POST /run HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"),
    ("TLS on the HTTP port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40),
    ("not HTTP at all", b"hello there\r\n\r\n"),
])
def test_what_the_http_parser_refuses_is_a_json_4xx(w: ApiWorker, name: str, data: bytes) -> None:
    error = refused(w, data, status=(400, 401, 413, 431))
    assert error.startswith(("bad HTTP request: ", "the request body ")), error
    assert "aaaa" not in error and "bbbb" not in error  # nothing of what was sent is echoed


def test_a_bogus_expect_header_is_a_json_417(w: ApiWorker) -> None:
    for value in ("bogus", b"\x80", b"100-continue\xff"):  # aiohttp's own answer to \x80 was a 500
        for method, path in (("POST", "/run"), ("GET", "/health"), ("GET", "/no/such/route")):
            error = refused(w, post_json(method, path, '{"input": {}}', headers=[("Expect", value)]), status=417)
            assert error == "the Expect header may only be '100-continue'"
    resp = send(w, post_json("POST", "/run", '{"input": {}}', headers=[("Expect", "100-Continue")]))
    assert resp.status == 200, resp.raw


# --- 4. the API key never reaches a log or a reply ----------------------------------------------------------


@pytest.mark.parametrize("data", [
    request_bytes("GET", "/workflows", headers=[("Authorization", f"Bearer {KEY}\x00".encode())]),
    request_bytes("GET", "/workflows", headers=[("Authorization", f"Bearer {KEY}\x01".encode())]),
    request_bytes("GET", "/workflows", headers=[("Authorization", f"{KEY}\x7f".encode())]),
    request_bytes("GET", "/workflows", headers=[("X-Api-Key", f"{KEY}\x00".encode())]),
    request_bytes("GET", f"/status/{KEY}\x00", key=None),
    request_bytes("GET", "/health", headers=[("Authorization", f"Bearer {KEY}".encode() + b"k" * 9000)]),
], ids=["bearer+NUL", "bearer+SOH", "bare+DEL", "other header+NUL", "in the path+NUL", "in a header too long"])
def test_the_api_key_never_reaches_a_reply_or_the_log(w: ApiWorker, data: bytes) -> None:
    resp = send(w, data)
    assert 400 <= resp.status < 500 and resp.is_json_error, resp.raw[:600]
    assert KEY.encode() not in resp.raw
    time.sleep(0.2)
    assert KEY not in w.log_text()


# --- 2. 500 instead of 4xx -----------------------------------------------------------------------------------


def test_text_that_cannot_be_stored_is_refused_naming_the_field(w: ApiWorker) -> None:
    lone = "a lone surrogate: not valid Unicode, so it cannot be stored or sent; send valid UTF-8 text"
    for path, body, where in [
        ("/run", '{"input": {"workflow": "\\ud800"}}', "input.workflow holds \\ud800 at character 0"),
        ("/runsync", '{"input": {"workflow": {"6": {"inputs": {"text": "ok \\udfff"}}}}}',
         'input.workflow["6"].inputs.text holds \\udfff at character 3'),
        ("/run", '{"input": {"x\\ud800": 1}}', "a key of input ('x\\ud800') holds \\ud800 at character 1"),
        ("/api/run", '{"deployment_id": "face", "inputs": {"prompt": "\\ud83d"}}',
         "inputs.prompt holds \\ud83d at character 0"),
        ("/api/upload-url", '{"filename": "a.png", "content_type": "\\ud800"}',
         "content_type holds \\ud800 at character 0"),
    ]:
        error = refused(w, post_json("POST", path, body))
        assert error == f"the request body cannot be accepted: {where}, {lone}", (path, error)
    # in the URL, the parser refuses such bytes itself, and a percent-encoded one is never decoded to a surrogate
    error = refused(w, request_bytes("GET", "/status/\xed\xa0\x80", key=KEY))
    assert error == "bad HTTP request: Invalid char in url path"
    error = refused(w, request_bytes("GET", "/status/%ED%A0%80", key=KEY), status=404)
    assert error.startswith("job '%ED%A0%80' not found")
    # a well-formed pair (an emoji) is fine, and the worker goes on
    assert send(w, post_json("POST", "/run", '{"input": {"workflow": "\\ud83d\\ude00"}}')).status == 200


@pytest.mark.parametrize("depth", [101, 950, 5000])
@pytest.mark.parametrize("kind", ["list", "object"])
def test_json_nested_too_deep_is_a_400(w: ApiWorker, depth: int, kind: str) -> None:
    opened, closed = ("[", "]") if kind == "list" else ('{"a":', "}")
    inner = opened * depth + ("0" if kind == "object" else "") + closed * depth
    for path in ("/run", "/runsync", "/api/run"):
        error = refused(w, post_json("POST", path, '{"input": ' + inner + '}'))
        assert "nested deeper than 100 levels" in error, error


@pytest.mark.parametrize("encoding", ["deflate", "br", "gzip", "zstd"])
def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400(w: ApiWorker, encoding: str) -> None:
    error = refused(w, post_json("POST", "/run", '{"input": {}}', headers=[("Content-Encoding", encoding)]))
    assert error.startswith(f"the request body is not valid '{encoding}' data (Content-Encoding: {encoding})")


def test_bodies_that_are_fine_after_all(w: ApiWorker) -> None:
    """A real gzip body, and a bogus charset on UTF-8 JSON (JSON is UTF-8 whatever the header claims)."""
    packed = gzip.compress(b'{"input": {"workflow": "nope"}}')
    resp = send(w, request_bytes("POST", "/run", packed, [("Content-Encoding", "gzip")], key=KEY))
    assert resp.status == 200 and resp.json()["status"] == "IN_QUEUE", resp.raw
    resp = send(w, request_bytes("POST", "/run", b'{"input": {}}', [("Content-Type", "application/json; "
                                                                                     "charset=no-such")], key=KEY))
    assert resp.status == 200, resp.raw
    error = refused(w, post_json("POST", "/run", b'{"input": "\xff\xfe"}'))
    assert error.startswith("the request body is not UTF-8 (byte 11 is 0xff)"), error


@pytest.mark.parametrize("path, method", [("/run", "POST"), ("/runsync", "POST"), ("/status/x", "GET"),
                                          ("/cancel/x", "POST"), ("/stream/x", "GET"), ("/purge-queue", "POST"),
                                          ("/workflows", "GET"), ("/api/run?run_id=x", "GET"),
                                          ("/api/upload-url", "POST"), ("/api/files/x/0/a.png", "GET")])
def test_an_authorization_header_that_is_not_utf8_is_a_401(w: ApiWorker, path: str, method: str) -> None:
    for value in (b"Bearer \xff\xfe", b"\xc3\x28", KEY.encode() + b"\xe9"):
        error = refused(w, request_bytes(method, path, b"{}", [("Authorization", value)]), status=401)
        assert error.startswith("Unauthorized")


# --- 1. slow or half-sent requests are timed out; connections are bounded ------------------------------------


def test_headers_must_arrive_within_header_timeout(w: ApiWorker) -> None:
    partial = send(w, b"POST /run HTTP/1.1\r\nHost: w\r\nContent-Le", timeout=HEADER_TIMEOUT_S + 5)
    assert partial.status == 408 and partial.is_json_error, partial.raw
    assert partial.json()["error"] == "the request headers did not arrive within 1 s (HEADER_TIMEOUT_S)"
    assert HEADER_TIMEOUT_S - 0.1 < partial.elapsed_s < HEADER_TIMEOUT_S + 2
    silent = send(w, b"", timeout=HEADER_TIMEOUT_S + 5)  # a connection that says nothing is closed, no answer
    assert silent.status == 0 and silent.raw == b"" and silent.elapsed_s < HEADER_TIMEOUT_S + 2
    # between requests on a kept-alive connection too
    with socket.create_connection(("127.0.0.1", w.port), timeout=HEADER_TIMEOUT_S + 5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: w\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        started = time.monotonic()
        later = b""
        while chunk := sock.recv(65536):
            later += chunk
        assert later.startswith(b"HTTP/1.1 408") and time.monotonic() - started < HEADER_TIMEOUT_S + 2, later


def test_a_body_must_arrive_within_body_timeout(w: ApiWorker) -> None:
    head = request_bytes("POST", "/run", b"", [("Content-Type", "application/json")], key=KEY, length=False)
    with socket.create_connection(("127.0.0.1", w.port), timeout=BODY_TIMEOUT_S + 10) as sock:
        sock.sendall(head[:-2] + b"Content-Length: 100\r\n\r\n" + b'{"input": ')
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):  # the answer, then the worker closes after draining for 1 s at most
            received += chunk
        took = time.monotonic() - started
    resp = RawResponse(status=int(received.split(b" ", 2)[1]), body=received.partition(b"\r\n\r\n")[2])
    assert resp.status == 408, received
    assert json.loads(resp.body) == {"error": "the request body did not arrive within 2 s (BODY_TIMEOUT_S); send it "
                                              "at once after the headers"}
    assert BODY_TIMEOUT_S - 0.1 < took < BODY_TIMEOUT_S + 1 + 2, took


def _open(w: ApiWorker, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", w.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def test_connections_are_bounded_and_health_still_gets_through(w: ApiWorker) -> None:
    # MAX_CONNECTIONS idle or half-sent connections: a new one still gets its answer (the oldest makes room)
    idle = [_open(w, b"GET /health HTTP/1.1\r\n" if i % 2 else b"") for i in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        assert send(w, request_bytes("GET", "/health")).status == 200
        assert send(w, request_bytes("GET", "/workflows", key=KEY)).status == 200
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    # MAX_CONNECTIONS connections busy with a request (a body still coming): a new one is refused, in JSON
    busy = [_open(w, request_bytes("POST", "/run", b"", key=KEY, length=False)[:-2] + b"Content-Length: 50\r\n\r\n")
            for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(1.0)  # the worker has read their headers: every connection is inside a request
        over = send(w, request_bytes("GET", "/health"))
        assert over.status == 503 and over.is_json_error, over.raw
        assert "MAX_CONNECTIONS" in over.json()["error"] and over.headers.get("retry-after") == "1"
    finally:
        for sock in busy:
            sock.close()
    # once the worker has seen them close, new clients get through again
    wait_for(lambda: send(w, request_bytes("GET", "/health")).status == 200, 10, interval=0.2,
             what="/health to answer 200 after the busy connections closed")


# --- 7. the Deploy facade's uploads --------------------------------------------------------------------------


def deploy_run(w: ApiWorker, inputs: dict[str, Any]) -> dict[str, Any]:
    """A run of the ``face`` deployment, waited for until it succeeded or failed."""
    run = w.api.ok("POST", "/api/run", {"deployment_id": "face", "inputs": inputs})
    return wait_for(lambda: (out := w.api.ok("GET", f"/api/run?run_id={run['run_id']}"))["status"] in
                    ("success", "failed") and out, 60, interval=0.05, what="the Deploy run to finish")


def upload_url(w: ApiWorker, content_type: Any = "image/png", filename: str = "face.png") -> tuple[int, Any]:
    return w.api.post("/api/upload-url", {"filename": filename, "content_type": content_type})


@pytest.mark.parametrize("content_type", ["image/png\r\nX-Injected: 1", "image/png\n", "image/png\x00",
                                          "text/html", "application/javascript", "image/svg+xml", 42, ["image/png"]])
def test_upload_content_types_come_from_a_short_list(w: ApiWorker, content_type: Any) -> None:
    status, body = upload_url(w, content_type)
    assert status == 400 and body["error"].startswith("'content_type' "), body
    assert body["error"].endswith("is not accepted; accepted: image/png, image/jpeg, image/webp, image/gif, "
                                  "image/bmp, image/tiff, application/octet-stream")


def test_an_upload_url_takes_one_file_and_files_are_served_as_attachments(w: ApiWorker) -> None:
    picture = png_bytes((10, 200, 10), (64, 64))
    status, up = upload_url(w, "IMAGE/PNG; charset=binary")
    assert status == 200, up
    assert w.api.request("PUT", up["upload_url"], raw=picture, key=None)[0] == 200
    status, body = w.api.request("PUT", up["upload_url"], raw=b"<html>overwritten</html>", key=None)
    assert status == 409 and "already used" in body["error"], body
    # served back: the bytes stored first, as a download of a harmless type
    resp = send(w, request_bytes("GET", up["file_url"].removeprefix(w.api.base), key=KEY))
    assert resp.status == 200 and resp.body == picture
    assert resp.headers["content-type"] == "image/png"
    assert resp.headers["content-disposition"] == 'attachment; filename="face.png"'
    assert resp.headers["x-content-type-options"] == "nosniff"
    # a run consumes it; the URL still cannot be written again
    out = deploy_run(w, {"face": up["file_url"], "steps": 1})
    assert out["status"] == "success", out
    assert w.api.request("PUT", up["upload_url"], raw=picture, key=None)[0] == 409
    output = send(w, request_bytes("GET", out["workflow_outputs"]["images"][0]["url"].removeprefix(w.api.base),
                                   key=KEY))
    assert output.status == 200 and output.headers["content-disposition"].startswith("attachment; filename=")
    assert output.headers["x-content-type-options"] == "nosniff"


def test_a_broken_off_upload_leaves_the_url_usable(w: ApiWorker) -> None:
    status, up = upload_url(w)
    path = up["upload_url"].removeprefix(w.api.base)
    slow = send(w, request_bytes("PUT", path, b"", length=False)[:-2] + b"Content-Length: 100\r\n\r\n\x89PNG",
                timeout=BODY_TIMEOUT_S + 5)
    assert slow.status == 408 and slow.is_json_error, slow.raw
    assert w.api.request("PUT", up["upload_url"], raw=png_bytes(), key=None)[0] == 200


# --- 6. image-size bombs -------------------------------------------------------------------------------------


def bomb_png() -> bytes:
    """A 12000 x 12000 one-bit PNG: about 17 KB, 144 megapixels."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    return buf.getvalue()


class FileServer:
    """A loopback HTTP server serving one file at /bomb.png."""

    def __init__(self, data: bytes) -> None:
        body = data

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/bomb.png"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def comfy_uploads(w: ApiWorker) -> int:
    path = Path(w.env["STANDIN_REQUEST_LOG"])
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if json.loads(line)["path"] == "/upload/image")


def test_image_size_bombs_are_refused_on_every_input_path(w: ApiWorker) -> None:
    bomb = bomb_png()
    assert len(bomb) < 20_000
    data_uri = "data:image/png;base64," + base64.b64encode(bomb).decode()
    server = FileServer(bomb)
    try:
        status, up = upload_url(w)
        assert w.api.request("PUT", up["upload_url"], raw=bomb, key=None)[0] == 200
        inline = {"workflow": {**INVERT, "1": {"class_type": "LoadImage", "inputs": {"image": data_uri}}}}
        inline_url = {"workflow": {**INVERT, "1": {"class_type": "LoadImage", "inputs": {"image": server.url}}}}
        jobs = {
            "images[] base64": {"workflow": INVERT, "images": [{"name": "in.png", "image": data_uri[22:]}]},
            "images[] URL": {"workflow": INVERT, "images": [{"name": "in.png", "image": server.url}]},
            "inline data URI": inline,
            "inline URL": inline_url,
            "named workflow parameter": {"workflow": "face", "inputs": {"face": data_uri, "steps": 1}},
            "Deploy upload": {"workflow": "face", "inputs": {"face": up["file_url"], "steps": 1}},
        }
        before = comfy_uploads(w)
        for name, job in jobs.items():
            if name == "Deploy upload":
                out = deploy_run(w, job["inputs"])
                status, error = out["status"], out["error"]
                assert status == "failed", (name, out)
            else:
                result = w.api.ok("POST", "/runsync", {"input": job})
                status, error = result["status"], result.get("error", "")
                assert status == "FAILED", (name, result)
            assert error.startswith("Failed to upload one or more input images: "), (name, error)
            assert "is 12000 x 12000 pixels (144.0 megapixels), over the limit of 64.0 megapixels " \
                   "(MAX_INPUT_PIXELS)" in error, (name, error)
        assert comfy_uploads(w) == before  # ComfyUI never received any of them
    finally:
        server.close()
