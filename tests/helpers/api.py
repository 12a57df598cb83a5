"""Helpers for front-door tests: a documented-shape comparator, a small HTTP client, and a worker on a port.

``assert_shape(actual, documented)`` compares a response with a seed's documented response (a fixture in
``tests/fixtures/seeds/``): the same keys at every level (``extra`` lists keys allowed beyond the documented
ones, ``optional`` documented keys that may be absent or empty), the same JSON types, and every list element shaped
like the documented first element. Values are not compared (ids, times and image bytes differ).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from tests.helpers.worker import ROOT, WorkerProcess, free_port, wait_for, worker_env

SEEDS = ROOT / "tests" / "fixtures" / "seeds"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def seed(name: str) -> Any:
    return json.loads((SEEDS / name).read_text(encoding="utf-8"))


def seed_001_with_steps(steps: int) -> dict[str, Any]:
    """Seed 001's request (a sampler graph) with ``steps`` sampler steps: its run time, with STANDIN_STEP_DELAY_S."""
    out = seed("001_request.json")
    out["input"]["workflow"]["31"]["inputs"]["steps"] = steps
    return out


def seed_models(*names: str) -> dict[str, list[str]]:
    table = seed("models.json")
    merged: dict[str, list[str]] = {}
    for name in names:
        for key, files in table[name].items():
            merged.setdefault(key, [])
            merged[key] += [f for f in files if f not in merged[key]]
    return merged


def write_models(models_dir: Path, models: Mapping[str, list[str]]) -> None:
    from tests.helpers.standin import write_model_file

    for key, names in models.items():
        for name in names:
            write_model_file(models_dir / key / name)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def shape_problems(actual: Any, documented: Any, path: str = "$", *, extra: frozenset[str] = frozenset(),
                   optional: frozenset[str] = frozenset()) -> list[str]:
    """Every difference in shape; ``extra``/``optional`` name keys as ``$.output.errors`` style paths."""
    problems: list[str] = []
    if _kind(actual) != _kind(documented):
        return [f"{path}: {_kind(actual)} where the seed documents {_kind(documented)}"]
    if isinstance(documented, dict):
        for key in documented:
            if key not in actual and f"{path}.{key}" not in optional:
                problems.append(f"{path}.{key}: missing")
        for key in actual:
            if key not in documented and f"{path}.{key}" not in extra:
                problems.append(f"{path}.{key}: not in the seed's documented shape")
        for key in documented:
            if key in actual:
                problems += shape_problems(actual[key], documented[key], f"{path}.{key}", extra=extra,
                                           optional=optional)
    elif isinstance(documented, list) and documented:
        if not actual and path not in optional:
            problems.append(f"{path}: empty where the seed documents items")
        for i, item in enumerate(actual):
            problems += shape_problems(item, documented[0], f"{path}[]", extra=extra, optional=optional)
            if i > 20:
                break
    return problems


def assert_shape(actual: Any, documented: Any, *, extra: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> None:
    problems = shape_problems(actual, documented, extra=frozenset(extra), optional=frozenset(optional))
    assert not problems, "shape differs from the seed's documentation:\n  " + "\n  ".join(problems) + \
        f"\nactual: {json.dumps(actual)[:1500]}"


def png_of(b64: str) -> Image.Image:
    data = base64.b64decode(b64, validate=True)
    assert data.startswith(PNG_SIGNATURE), data[:16]
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 10) -> tuple[int, Any, bytes]:
    """GET ``url``: status, response headers and raw body, whatever the status (probes and /metrics need all three)."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


class Api:
    """A tiny synchronous HTTP client (urllib): JSON in, (status, JSON or bytes) out."""

    def __init__(self, base: str, key: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.key = key

    def request(self, method: str, path: str, body: Any = None, *, key: Any = "default", raw: bytes | None = None,
                headers: Mapping[str, str] | None = None, timeout: float = 60) -> tuple[int, Any]:
        url = path if path.startswith("http") else self.base + path
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None and raw is None:
            req.add_header("Content-Type", "application/json")
        token = self.key if key == "default" else key
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, payload, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, payload, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        if "json" in ctype:
            return status, json.loads(payload)
        return status, payload

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, body, **kw)

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, payload = self.request(method, path, body, **kw)
        assert status == 200, (status, payload)
        return payload

    def wait_status(self, job_id: str, statuses: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
        seen: list[str] = []

        def check() -> dict[str, Any] | None:
            body = self.ok("GET", f"/status/{job_id}")
            if not seen or seen[-1] != body["status"]:
                seen.append(body["status"])
            return body if body["status"] in statuses else None

        try:
            return wait_for(check, timeout, interval=0.05, what=f"job {job_id} in {statuses}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; statuses seen: {seen}") from None


class ApiWorker:
    """``python -m supervisor`` in self-hosted mode on a free port, with an Api client for it."""

    def __init__(self, tmp_path: Path, log_name: str = "worker.log", **env: Any) -> None:
        self.port = free_port()
        self.env = worker_env(tmp_path, API_PORT=str(self.port), WORKER_MODE="http", **env)
        self.tmp_path = tmp_path
        self.log_path = tmp_path / log_name
        self.api = Api(f"http://127.0.0.1:{self.port}", self.env.get("API_KEY"))
        self.proc: WorkerProcess | None = None

    def start(self, wait: bool = True, log_name: str | None = None,
              preexec_fn: Callable[[], Any] | None = None, ready_timeout: float = 30) -> "ApiWorker":
        self.proc = WorkerProcess(self.env, self.tmp_path / (log_name or self.log_path.name), preexec_fn)
        if wait:
            self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.proc.returncode}:\n{self.proc.log_text()[-3000:]}")
            try:
                status, _ = self.api.get("/ready", timeout=2)
            except OSError:
                return False
            return status == 200

        wait_for(ready, timeout, interval=0.05, what="the API to answer /ready with 200")

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc else ""


@contextlib.contextmanager
def api_worker(tmp_path: Path, ready_timeout: float = 30, **env: Any) -> Iterator[ApiWorker]:
    """A started self-hosted worker (``/health`` 200: ComfyUI ready, within ``ready_timeout`` s); stopped with
    SIGTERM (then killed) at the end, its tree checked."""
    import signal

    from tests.helpers.worker import tree_processes

    worker = ApiWorker(tmp_path, **env).start(ready_timeout=ready_timeout)
    try:
        yield worker
    finally:
        assert worker.proc is not None
        if worker.proc.proc.poll() is None:
            worker.proc.signal(signal.SIGTERM)
            try:
                worker.proc.wait(30)
            except Exception:  # noqa: BLE001
                pass
        worker.proc.cleanup()
        deadline = time.monotonic() + 5
        while tree_processes(worker.env["TEST_TREE_ID"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = tree_processes(worker.env["TEST_TREE_ID"])
        for proc in leftovers:
            proc.kill()
        assert not leftovers, f"processes survived the worker: {leftovers}"
