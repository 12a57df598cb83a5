"""Harness: run the stand-in ComfyUI (tests/standin/main.py) as a real process on a free port.

    sd = start_standin(tmp_path, env={"STANDIN_STEP_DELAY_S": "0.2"}, models={"checkpoints": ["sd15.safetensors"]})
    ... talk to sd.url ...
    sd.stop()

The process runs in its own process group (so ``stop()`` also reaches children such as the
STANDIN_SPAWN_GRANDCHILD one), with every ComfyUI directory under ``tmp_path`` and a request log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

STANDIN_DIR = Path(__file__).resolve().parents[1] / "standin"
STANDIN_MAIN = STANDIN_DIR / "main.py"

# Folder keys the generated extra_model_paths.yaml always maps to <models_dir>/<key>.
DEFAULT_MODEL_KEYS = ("checkpoints", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                      "ipadapter", "embeddings", "upscale_models", "controlnet", "vae_approx")


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to 0 and release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive TCP ports nobody listens on right now (COMFYUI_PORT + i per instance)."""
    for _ in range(200):
        first = free_port()
        if first + count - 1 > 65535:
            continue
        taken = False
        for port in range(first + 1, first + count):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    taken = True
                    break
        if not taken:
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


@dataclass
class StandIn:
    """A running stand-in process and the directories it was given."""

    url: str
    port: int
    proc: subprocess.Popen
    input_dir: Path
    output_dir: Path
    temp_dir: Path  # ComfyUI's temp dir (``--temp-directory X`` means ``X/temp``)
    user_dir: Path
    models_dir: Path
    log_path: Path
    request_log_path: Path
    extra_model_paths: Path
    argv: list[str] = field(default_factory=list)
    comfyui_dir: Path = STANDIN_DIR  # the tree main.py is in (the real ComfyUI's when started through comfy_targets)

    def requests(self) -> list[dict]:
        """The parsed STANDIN_REQUEST_LOG lines (one per HTTP request / ws connect)."""
        try:
            lines = self.request_log_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 15.0) -> float:
        """Poll GET /system_stats until 200; returns the seconds it took. Raises if the process dies."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stand-in exited with {self.proc.returncode} before serving:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=1) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"stand-in not ready after {timeout}s:\n{self.log_text()}")

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGINT the group, wait for a clean exit, then SIGKILL whatever is left of the group."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def write_model_file(path: Path) -> None:
    """A tiny stand-in model file; ``.safetensors`` get a valid header with ``__metadata__``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        header = json.dumps({"__metadata__": {"standin": path.name}}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header)
    else:
        path.write_bytes(b"standin-model:" + path.name.encode())


def _yaml_lines(models_dir: Path, keys: Iterable[str], custom_node_roots: list[Path]) -> list[str]:
    lines = ["standin:", f"  base_path: {models_dir}"]
    lines += [f"  {key}: {key}" for key in keys]
    if custom_node_roots:
        lines.append("  custom_nodes: |")
        lines += [f"    {root}" for root in custom_node_roots]
    return lines


def _install_custom_nodes(root: Path, custom_node_dirs: Iterable[os.PathLike | str]) -> list[Path]:
    """Packs (a dir with __init__.py, or a .py file) are copied into ``root``; other dirs are roots."""
    roots: list[Path] = []
    for entry in custom_node_dirs:
        src = Path(entry)
        if src.is_file() or (src / "__init__.py").exists():
            root.mkdir(parents=True, exist_ok=True)
            dst = root / src.name
            if src.is_file():
                shutil.copy2(src, dst)
            else:
                shutil.copytree(src, dst, dirs_exist_ok=True)
            if root not in roots:
                roots.append(root)
        else:
            roots.append(src)
    return roots


def start_standin(tmp_path: Path, *, env: Mapping[str, str | None] | None = None, extra_args: Iterable[str] = (),
                  models: Mapping[str, list[str]] | None = None,
                  custom_node_dirs: Iterable[os.PathLike | str] = (), wait: bool = True,
                  timeout: float = 15.0, use_extra_model_paths: bool = True, main: Path = STANDIN_MAIN,
                  python: str = sys.executable) -> StandIn:
    """Start ``python tests/standin/main.py`` with ComfyUI-style flags under ``tmp_path``.

    ``models`` maps folder keys to file names created under ``<models_dir>/<key>/``; ``env`` entries
    override (None removes) the inherited environment, e.g. the STANDIN_* fault knobs.
    ``custom_node_dirs``: pack directories / .py files (copied into a custom_nodes root the yaml names) or
    custom_nodes roots. ``use_extra_model_paths=False`` starts it with exactly the flags of the reference
    recording (no ``--extra-model-paths-config``; ``models``/``custom_node_dirs`` are then not wired in).
    ``main``/``python``: another ComfyUI started the same way (the real one: tests/helpers/comfy_targets.py).
    """
    base = Path(tmp_path) / f"standin-{time.monotonic_ns()}"
    input_dir, output_dir, temp_base, user_dir, models_dir = (base / n for n in
                                                               ("input", "output", "tmp", "user", "models"))
    for d in (input_dir, output_dir, temp_base, user_dir, models_dir):
        d.mkdir(parents=True, exist_ok=True)
    keys = list(DEFAULT_MODEL_KEYS)
    for key, names in (models or {}).items():
        if key not in keys:
            keys.append(key)
        for name in names:
            write_model_file(models_dir / key / name)
    roots = _install_custom_nodes(base / "custom_nodes", custom_node_dirs)
    yaml_path = base / "extra_model_paths.yaml"
    yaml_path.write_text("\n".join(_yaml_lines(models_dir, keys, roots)) + "\n", encoding="utf-8")

    port = free_port()
    request_log = base / "requests.jsonl"
    log_path = base / "standin.log"
    argv = [python, str(main), "--listen", "127.0.0.1", "--port", str(port), "--cpu",
            "--disable-auto-launch", "--output-directory", str(output_dir), "--input-directory", str(input_dir),
            "--temp-directory", str(temp_base), "--user-directory", str(user_dir),
            "--database-url", f"sqlite:///{base / 'comfyui.db'}"]
    if use_extra_model_paths:
        argv += ["--extra-model-paths-config", str(yaml_path)]
    argv += list(extra_args)
    child_env = dict(os.environ)
    child_env["STANDIN_REQUEST_LOG"] = str(request_log)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    for k, v in (env or {}).items():
        if v is None:
            child_env.pop(k, None)
        else:
            child_env[k] = str(v)
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child keeps writing after we return
    try:
        proc = subprocess.Popen(argv, cwd=str(base), env=child_env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log_file.close()
    sd = StandIn(url=f"http://127.0.0.1:{port}", port=port, proc=proc, input_dir=input_dir, output_dir=output_dir,
                 temp_dir=temp_base / "temp", user_dir=user_dir, models_dir=models_dir, log_path=log_path,
                 request_log_path=request_log, extra_model_paths=yaml_path, argv=argv, comfyui_dir=Path(main).parent)
    if wait:
        try:
            sd.wait_ready(timeout)
        except BaseException:
            sd.stop()
            raise
    return sd


# ------------------------------------------------------------------------------------------------------
# Reference transcripts (tests/fixtures/reference): loading, replaying, structural comparison.

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
TRANSCRIPTS_DIR = REFERENCE_DIR / "comfyui-transcripts"

# Keys whose values legitimately differ between the recording and any other run: generated ids,
# clocks, tracebacks, machine memory and interpreter details. Only their JSON type is compared.
VARYING_KEYS = frozenset({"prompt_id", "timestamp", "sid", "traceback", "ram_total", "ram_free", "vram_total",
                          "vram_free", "torch_vram_total", "torch_vram_free", "python_version", "pytorch_version", "argv"})


def load_transcript(name: str) -> list[dict]:
    """The recorded events of one transcript file (``a_emptyimage_saveimage`` or with ``.json``)."""
    if not name.endswith(".json"):
        name += ".json"
    return json.loads((TRANSCRIPTS_DIR / name).read_text(encoding="utf-8"))


def transcript_cases(events: list[dict]) -> dict[str, list[dict]]:
    """Split a transcript at its ``note`` events ``case <name>`` into ``{name: [events...]}``."""
    cases: dict[str, list[dict]] = {}
    current: list[dict] | None = None
    for event in events:
        if event["kind"] == "note" and str(event.get("text", "")).startswith("case "):
            current = cases.setdefault(event["text"][5:], [])
        elif current is not None:
            current.append(event)
    return cases


def http_events(events: list[dict]) -> list[dict]:
    return [e for e in events if e["kind"] == "http"]


def ws_messages(events: list[dict]) -> list[dict]:
    return [e["msg"] for e in events if e["kind"] == "ws_text"]


def substitute(value, mapping: Mapping[str, str]):
    """Rewrite recorded absolute paths (``/opt/ComfyUI``, ``/data/...``) to this run's, recursively."""
    if isinstance(value, str):
        for old, new in mapping.items():
            if value == old or value.startswith(old + "/"):
                return new + value[len(old):]
        return value
    if isinstance(value, list):
        return [substitute(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, mapping) for k, v in value.items()}
    return value


def path_mapping(sd: StandIn) -> dict[str, str]:
    """The recording ran with ComfyUI in /opt/ComfyUI and --output/--input/--temp dirs under /data."""
    return {"/opt/ComfyUI": str(sd.comfyui_dir), "/data/output": str(sd.output_dir), "/data/input": str(sd.input_dir),
            "/data/user": str(sd.user_dir), "/data/temp": str(sd.temp_dir)}


def diff_structure(actual, expected, *, varying: frozenset[str] = VARYING_KEYS, path: str = "$",
                   check_order: bool = True) -> list[str]:
    """Differences between two JSON values: same keys (and key order), same list lengths, equal scalars;
    keys in ``varying`` only need the same JSON type. Returns human-readable paths of every mismatch."""
    problems: list[str] = []
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected object, got {type(actual).__name__}: {actual!r:.200}"]
        if set(actual) != set(expected):
            problems.append(f"{path}: keys differ: missing {sorted(set(expected) - set(actual))}, "
                            f"extra {sorted(set(actual) - set(expected))}")
        elif check_order and list(actual) != list(expected):
            problems.append(f"{path}: key order {list(actual)} != {list(expected)}")
        for key in expected:
            if key not in actual:
                continue
            if key in varying:
                if _json_type(actual[key]) != _json_type(expected[key]):
                    problems.append(f"{path}.{key}: type {_json_type(actual[key])} != {_json_type(expected[key])}")
                continue
            problems += diff_structure(actual[key], expected[key], varying=varying, path=f"{path}.{key}",
                                       check_order=check_order)
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: expected list, got {actual!r:.200}"]
        if len(actual) != len(expected):
            return [f"{path}: length {len(actual)} != {len(expected)}: {actual!r:.300} vs {expected!r:.300}"]
        for i, (a, e) in enumerate(zip(actual, expected)):
            problems += diff_structure(a, e, varying=varying, path=f"{path}[{i}]", check_order=check_order)
        return problems
    if _json_type(actual) != _json_type(expected) or actual != expected:
        problems.append(f"{path}: {actual!r:.300} != {expected!r:.300}")
    return problems


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


async def replay_request(session, base_url: str, request: Mapping) -> tuple[int, str | None, object, bytes]:
    """Send a recorded HTTP request (json / raw_body / headers) with an aiohttp session.

    Returns (status, content type or None, parsed JSON or text, raw body). Multipart requests are not
    replayable byte-for-byte (the recording kept no file bytes); callers build those themselves.
    """
    status, content_type, body, raw, _ = await _request_with_headers(session, base_url, request)
    return status, content_type, body, raw


class TranscriptReplayer:
    """Replay one recorded session against a stand-in and compare everything it saw.

    HTTP exchanges are replayed in order (recorded prompt ids are mapped to the ids this run returns;
    recorded paths to this run's dirs); after a ``POST /prompt`` with a ``client_id`` it waits for that
    prompt's end signal like the recording client did, and ``/history/{id}`` requests whose recorded answer
    was non-empty are polled until the entry exists. ``comparisons`` collects human-readable problems;
    ``ws_problems()`` compares the whole websocket stream with the recorded one at the end.
    ``upload_bytes`` supplies the file bytes of the n-th multipart upload (the recording kept none).
    """

    def __init__(self, sd: StandIn, events: list[dict], upload_bytes=None, varying: frozenset[str] = VARYING_KEYS,
                 normalise=None):
        self.normalise = normalise or (lambda value: value)
        self.sd = sd
        self.events = events
        self.upload_bytes = upload_bytes or (lambda index, part: b"")
        self.varying = varying
        self.id_map: dict[str, str] = {}
        self.problems: list[str] = []
        self.received: list[dict] = []
        self._uploads = 0

    def expected_ws(self) -> list[dict]:
        return [self._map(m) for m in ws_messages(self.events)]

    def _map(self, value):
        value = substitute(value, path_mapping(self.sd))
        return _replace_ids(value, self.id_map)

    async def run(self, session) -> None:
        import asyncio  # noqa: PLC0415
        opens = [e for e in self.events if e["kind"] == "ws_open"]
        ws = None
        reader = None
        if opens:
            url = opens[0]["url"].split(" ")[0]
            ws = await session.ws_connect(self.sd.url + url)
            for sent in [e for e in self.events if e["kind"] == "ws_sent"][:1]:
                await ws.send_json(sent["msg"])
            reader = asyncio.ensure_future(self._read(ws))
        try:
            for event in http_events(self.events):
                await self._exchange(session, event)
            await asyncio.sleep(0.3)
        finally:
            if ws is not None:
                await ws.close()
            if reader is not None:
                reader.cancel()

    async def _read(self, ws) -> None:
        async for msg in ws:
            if msg.type.name == "TEXT":
                self.received.append(json.loads(msg.data))

    async def _wait_end(self, prompt_id: str, timeout: float = 15.0) -> None:
        import asyncio  # noqa: PLC0415
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m["type"] == "executing" and m["data"].get("node") is None
                   and m["data"].get("prompt_id") == prompt_id for m in self.received):
                return
            await asyncio.sleep(0.01)
        self.problems.append(f"no end signal for prompt {prompt_id}")

    async def _poll_history(self, session, path: str, timeout: float = 15.0) -> None:
        import asyncio  # noqa: PLC0415
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with session.get(self.sd.url + path) as resp:
                if await resp.json():
                    return
            await asyncio.sleep(0.02)

    async def _exchange(self, session, event: dict) -> None:
        req = dict(event["request"])
        resp = event["response"]
        req["path"] = _replace_ids(req["path"], self.id_map)
        if req["path"].startswith("/history/") and resp.get("json"):
            await self._poll_history(session, req["path"])
        if "multipart" in req:
            status, content_type, body, raw, headers = await self._multipart(session, req)
        else:
            status, content_type, body, raw, headers = await _request_with_headers(session, self.sd.url, req)
        where = f"{req['method']} {req['path']}"
        if status != resp["status"]:
            self.problems.append(f"{where}: status {status} != {resp['status']} ({body!r:.300})")
            return
        if resp.get("content_type") is not None or status != 403:
            if content_type != resp.get("content_type"):
                self.problems.append(f"{where}: content type {content_type} != {resp.get('content_type')}")
        if req["method"] == "POST" and req["path"] == "/prompt" and status == 200:
            recorded_id = resp["json"]["prompt_id"]
            self.id_map.setdefault(recorded_id, body["prompt_id"])
            if (req.get("json") or {}).get("client_id"):
                await self._wait_end(body["prompt_id"])
        if "json" in resp:
            self.problems += [f"{where}: {p}" for p in diff_structure(
                self.normalise(body), self.normalise(self._map(resp["json"])), varying=self.varying)]
        elif "body_magic_hex" in resp:
            self._compare_binary(where, resp, raw, headers)
        elif "text" in resp and body != resp["text"]:
            self.problems.append(f"{where}: body {body!r:.200} != {resp['text']!r:.200}")

    def _compare_binary(self, where: str, resp: dict, raw: bytes, headers) -> None:
        magic = bytes.fromhex(resp["body_magic_hex"])
        same = raw[:4] == magic[:4] and raw[8:16] == magic[8:16]  # RIFF/PNG signature and chunk tag
        if not same:
            self.problems.append(f"{where}: body starts {raw[:16].hex()} != {magic.hex()}")
        if resp.get("content_disposition") and headers.get("Content-Disposition") != resp["content_disposition"]:
            self.problems.append(f"{where}: disposition {headers.get('Content-Disposition')} != "
                                 f"{resp['content_disposition']}")

    async def _multipart(self, session, req: dict):
        import aiohttp  # noqa: PLC0415
        form = aiohttp.FormData()
        for name, part in req["multipart"].items():
            if isinstance(part, dict) and name == "image":
                data = self.upload_bytes(self._uploads, part)
                self._uploads += 1
                form.add_field(name, data, filename=part["filename"],
                               content_type=part.get("content_type") or "application/octet-stream")
            elif isinstance(part, dict):
                form.add_field(name, json.dumps(part))
            else:
                form.add_field(name, str(part))
        async with session.post(self.sd.url + req["path"], data=form) as resp:
            raw = await resp.read()
            body: object = raw.decode("utf-8", errors="replace")
            if resp.content_type == "application/json" and raw:
                body = json.loads(raw)
            return resp.status, resp.headers.get("Content-Type"), body, raw, resp.headers

    def ws_problems(self, *, skip_types: frozenset[str] = frozenset()) -> list[str]:
        expected = [m for m in self.expected_ws() if m["type"] not in skip_types]
        actual = [m for m in self.received if m["type"] not in skip_types]
        problems = []
        if [m["type"] for m in actual] != [m["type"] for m in expected]:
            problems.append("ws types differ:\n  got      " + " ".join(m["type"] for m in actual)
                            + "\n  recorded " + " ".join(m["type"] for m in expected))
        problems += diff_structure(self.normalise(actual), self.normalise(expected), varying=self.varying, path="ws")
        return problems


async def _request_with_headers(session, base_url: str, request: Mapping):
    """:func:`replay_request`, plus the response headers."""
    kwargs: dict = {}
    headers = dict(request.get("headers") or {})
    if "json" in request:
        kwargs["json"] = request["json"]
    elif "raw_body" in request:
        kwargs["data"] = request["raw_body"].encode()
        headers["Content-Type"] = request.get("content_type") or "application/octet-stream"
    if headers:
        kwargs["headers"] = headers
    async with session.request(request["method"], base_url + request["path"], **kwargs) as resp:
        raw = await resp.read()
        body: object = raw.decode("utf-8", errors="replace")
        if resp.content_type == "application/json" and raw:
            body = json.loads(raw)
        return resp.status, resp.headers.get("Content-Type"), body, raw, resp.headers


def _replace_ids(value, id_map: Mapping[str, str]):
    """Map recorded prompt ids to this run's, in strings (also inside paths) and dict keys."""
    if not id_map:
        return value
    if isinstance(value, str):
        for old, new in id_map.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [_replace_ids(v, id_map) for v in value]
    if isinstance(value, dict):
        return {_replace_ids(k, id_map): _replace_ids(v, id_map) for k, v in value.items()}
    return value
