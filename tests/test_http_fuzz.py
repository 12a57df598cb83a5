"""Thousands of generated malformed requests against every route of a real worker: no 5xx, every error the
documented JSON, the key never echoed, and the worker then serves a valid job.

Hypothesis generates the requests: methods (real and not), paths (every route, with odd ids, percent-escapes,
raw bytes), headers (auth variants with control characters and bytes that are not UTF-8, content encodings,
``Transfer-Encoding``, ``Expect``, random ones) and bodies (JSON with lone surrogates, deep nesting, odd keys; the
job shape with random inputs; gzip; random bytes). Most requests are well-formed enough to get past the HTTP
parser to auth, routing and intake (the test asserts at least 40 % do), the rest are refused by the parser. Each
goes over a new real socket (tests/helpers/rawhttp.py), exactly as generated; about 3000 in all, ~30 s.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.api import ROOT, ApiWorker, api_worker
from tests.helpers.rawhttp import RawResponse, exchange

pytestmark = pytest.mark.timeout(900)

KEY = "fuzz-key-0123456789abcdefghij"
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
FUZZ = settings(max_examples=1200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROUTES = ["/run", "/runsync", "/status/{id}", "/cancel/{id}", "/stream/{id}", "/purge-queue", "/health", "/workflows",
          "/v2/{id}/run", "/v2/{id}/runsync", "/v2/{id}/status/{id}", "/v2/{id}/health", "/api/run",
          "/api/run?run_id={id}", "/api/upload-url", "/api/upload/{id}", "/api/uploads/{id}/{id}",
          "/api/files/{id}/{id}/{id}", "/no/such/route", "/"]
FILE_ROUTES = (b"/api/uploads/", b"/api/files/")
seen: dict[str, int] = {}


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiWorker]:
    root = tmp_path_factory.mktemp("fuzz")
    with api_worker(root, API_KEY=KEY, HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S), BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
                    RUNSYNC_WAIT_S="0", MAX_QUEUE="20", ALLOW_URL_INPUTS="false", MAX_REQUEST_BYTES="65536",
                    JOB_RETENTION_S="30") as worker:
        yield worker


# --- strategies ----------------------------------------------------------------------------------------------

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)  # lone surrogates included
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), any_text)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)), max_leaves=20)
ids = st.one_of(st.sampled_from(["x", "sync-1", "0", "..", "%2e%2e", "%00", "%ED%A0%80", "%ff", "a%20b", "a.png",
                                 "x" * 300]),
                st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"), min_size=1,
                        max_size=40))
control = st.sampled_from([b"\x00", b"\x01", b"\x7f", b"\xff", b"\r", b"\x0b", b""])


@st.composite
def paths(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:  # anything at all
        return b"/" + draw(st.binary(max_size=60)).replace(b" ", b"")
    route = draw(st.sampled_from(ROUTES))
    while "{id}" in route:
        route = route.replace("{id}", draw(ids), 1)
    if kind == 1:
        route += "?" + draw(st.sampled_from(["wait=", "wait=-1", "wait=1e9", "wait=99999999999999999999", "run_id=",
                                             "wait=%ff", "a=b&a=c", "=", "%"]))
    return route.encode()


@st.composite
def auth_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    choice = draw(st.integers(0, 7))
    if choice == 0:
        return []
    if choice <= 2:
        return [(b"Authorization", b"Bearer " + KEY.encode())]
    if choice == 3:
        return [(b"Authorization", KEY.encode())]
    if choice == 4:  # the real key with something after it: must never be echoed
        return [(draw(st.sampled_from([b"Authorization", b"X-Api-Key"])),
                 b"Bearer " + KEY.encode() + draw(control) + draw(st.binary(max_size=4)))]
    if choice == 5:
        return [(b"Authorization", b"Bearer " + draw(st.text(printable, max_size=40)).encode())]
    return [(b"Authorization", draw(st.binary(max_size=40)))]


HEADER_NAMES = [b"Content-Type", b"Content-Encoding", b"Transfer-Encoding", b"Expect", b"Accept", b"Content-Length",
                b"Connection", b"Upgrade", b"Host", b"X-Forwarded-Host", b"X-Forwarded-Proto", b"Cookie"]
HEADER_VALUES = [b"application/json", b"application/json; charset=latin-1", b"application/json; charset=nope", b"gzip",
                 b"deflate", b"br", b"zstd", b"identity", b"chunked", b"gzip, chunked", b"100-continue", b"bogus",
                 b"close", b"keep-alive", b"websocket", b"-1", b"99999999999999999999", b"text/html", b"\x80",
                 b"\xff\xfe", b"100-continue\x00"]
printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@st.composite
def extra_header(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Mostly a name and value the parser takes (so the request reaches the app), now and then raw bytes."""
    kind = draw(st.integers(0, 9))
    if kind <= 8:
        name = draw(st.one_of(st.sampled_from(HEADER_NAMES), st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":()<>@,;\\\"/[]?={}"),
            min_size=1, max_size=20).map(str.encode)))
    else:
        name = draw(st.binary(min_size=1, max_size=20).filter(lambda b: b":" not in b and b"\n" not in b))
    if kind <= 5:
        return name, draw(st.one_of(st.sampled_from(HEADER_VALUES), st.text(printable, max_size=40).map(str.encode)))
    return name, draw(st.binary(max_size=40).filter(lambda b: b"\n" not in b))


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A body and the headers it needs (a real gzip body says so)."""
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return b"", []
    if kind == 1:
        return draw(st.binary(max_size=200)), []
    if kind == 2:  # deep nesting
        depth = draw(st.sampled_from([50, 99, 100, 101, 500, 999, 1000, 3000]))
        return (b'{"input": ' + b"[" * depth + b"]" * depth + b"}"), []
    value = draw(json_value)
    if kind == 3:
        doc: Any = value
    elif kind == 4:
        doc = {"deployment_id": draw(st.one_of(any_text, st.just("x"))), "inputs": value,
               "filename": draw(any_text), "content_type": draw(st.one_of(any_text, st.just("image/png")))}
    else:
        doc = {"input": value}
    raw = json.dumps(doc).encode()  # ASCII: lone surrogates travel as \u escapes, as a client would send them
    if kind == 7:
        return gzip.compress(raw), [(b"Content-Encoding", b"gzip")]
    return raw, []


@st.composite
def methods(draw: st.DrawFn) -> bytes:
    """Mostly methods the routes take, so that most requests get past the parser to auth, routing and intake."""
    kind = draw(st.integers(0, 9))
    if kind <= 6:
        return draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]))
    if kind <= 8:
        return draw(st.sampled_from([b"PATCH", b"OPTIONS", b"TRACE", b"HEAD", b"get", b"PO ST", b"G\x00T",
                                     b"\xff\xfe"]))
    return draw(st.binary(min_size=1, max_size=8).filter(lambda b: b" " not in b and b"\n" not in b))


def build(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes, length: str) -> bytes:
    out = method + b" " + path + b" HTTP/1.1\r\nHost: worker\r\n"
    for name, value in headers:
        out += name + b": " + value + b"\r\n"
    if length == "right":
        out += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    elif length == "short" and body:
        out += b"Content-Length: " + str(len(body) // 2).encode() + b"\r\n"
    return out + b"\r\n" + body


def check(w: ApiWorker, data: bytes, method: bytes, path: bytes) -> RawResponse:
    resp = exchange(w.port, data, timeout=HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 10)
    assert resp.status != 0, f"no answer to {data[:300]!r}: {resp.raw[:300]!r}"
    assert resp.status < 500, f"{resp.status} for {data[:300]!r}: {resp.raw[:500]!r}"
    assert KEY.encode() not in resp.raw, f"the key was echoed for {data[:300]!r}"
    json_type = resp.headers.get("content-type", "").startswith("application/json")
    if method == b"HEAD" and data.startswith(b"HEAD "):  # the answer has no body to check, only its type
        assert json_type or (resp.status < 400 and path.startswith(FILE_ROUTES)), resp.raw[:300]
    elif resp.status >= 400:
        assert resp.is_json_error, f"not the documented JSON error for {data[:300]!r}: {resp.raw[:500]!r}"
    elif not path.startswith(FILE_ROUTES) and method != b"OPTIONS":
        assert json_type, resp.raw[:300]
    seen[str(resp.status)] = seen.get(str(resp.status), 0) + 1
    by_parser = resp.status == 400 and resp.body and resp.json()["error"].startswith("bad HTTP request: ")
    seen["past the parser"] = seen.get("past the parser", 0) + (not by_parser)
    return resp


# --- the fuzz ------------------------------------------------------------------------------------------------


@FUZZ
@given(method=methods(), path=paths(), auth=auth_headers(), extra=st.lists(extra_header(), max_size=3),
       body=bodies(), length=st.sampled_from(["right", "right", "right", "none", "short"]))
def fuzz_requests(w: ApiWorker, method: bytes, path: bytes, auth: list[tuple[bytes, bytes]],
                  extra: list[tuple[bytes, bytes]], body: tuple[bytes, list[tuple[bytes, bytes]]], length: str) -> None:
    raw, needed = body
    check(w, build(method, path, auth + needed + extra, raw, length), method, path)


@FUZZ
@given(route=st.sampled_from(["/run", "/runsync", "/api/run", "/api/upload-url", "/v2/ep/run"]), body=bodies())
def fuzz_bodies(w: ApiWorker, route: str, body: tuple[bytes, list[tuple[bytes, bytes]]]) -> None:
    raw, needed = body
    headers = [(b"Authorization", b"Bearer " + KEY.encode()), (b"Content-Type", b"application/json"), *needed]
    check(w, build(b"POST", route.encode(), headers, raw, "right"), b"POST", route.encode())


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=st.binary(min_size=1, max_size=120), tail=st.binary(max_size=60))
def fuzz_garbage(w: ApiWorker, line: bytes, tail: bytes) -> None:
    data = line.replace(b"\n", b"") + b"\r\n" + tail.replace(b"\n", b"") + b"\r\n\r\n"
    check(w, data, b"", b"")


def test_thousands_of_malformed_requests_then_a_valid_job(w: ApiWorker) -> None:
    started = time.monotonic()
    fuzz_requests(w)
    fuzz_bodies(w)
    fuzz_garbage(w)
    answers = sum(n for status, n in seen.items() if status.isdigit())
    # the fuzz reaches the routes: many requests get past the HTTP parser to auth, routing and intake
    assert answers >= 2500 and seen["past the parser"] >= answers * 0.4, seen
    print("answers by status:", dict(sorted(seen.items())))
    job = json.loads((ROOT / "examples" / "runsync_no_models.json").read_text())
    w.api.ok("POST", "/purge-queue")
    submitted = w.api.ok("POST", "/run", job)
    final = w.api.wait_status(submitted["id"], ("COMPLETED", "FAILED"), timeout=60)
    assert final["status"] == "COMPLETED", final
    assert w.api.get("/health", key=None)[0] == 200
    log = w.log_text()
    assert KEY not in log
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
    malformed = [line for line in log.splitlines() if "malformed" in line]
    intervals = 1 + int((time.monotonic() - started) // 60)  # the log throttle's interval is 60 s
    assert len(malformed) <= intervals + 1, malformed  # one line per interval, however many there were

