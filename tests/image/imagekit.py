"""Pieces of the image test: the engine, the staged build context, a git server for a node pack, the build.

The test builds the real ``docker/Dockerfile`` through the real ``make build`` with a test variant's variables:
the local debootstrap base (no registry here), no torch, the stand-in as ComfyUI, models from the loopback hub
server, a node pack from a local git repository. The build runs with ``--network host`` so that its RUN steps
reach both servers on the host's 127.0.0.1. The context is a staged copy of the repository (so the code-only
rebuild check can change a file without touching the working tree).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import secrets
import http.server
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER_CLI = "/usr/bin/docker"  # the engine's own 20.10 client: its built-in BuildKit handles RUN --mount
BASE_TAG = "local/bookworm:base"
IMAGE = "comfyui-worker-imagetest"

# What the stand-in needs in ComfyUI's venv (same pins as the worker's, so pip's cache serves both venvs).
STANDIN_PACKAGES = "requests aiohttp==3.14.5 Pillow==13.0.0 PyYAML==6.0.3"

# The node pack served from a local git repository: one node class that passes an image through.
PACK_NAME = "ComfyUI-ImageTestPack"
PACK_CLASS = "ImageTestPassThrough"
PACK_INIT = f'''"""A node pack made by the image test: proves install_nodes.py cloned it at its pinned commit."""


class {PACK_CLASS}:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"images": ("IMAGE",)}}}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "image-test"

    def run(self, images):
        return (images,)


NODE_CLASS_MAPPINGS = {{"{PACK_CLASS}": {PACK_CLASS}}}
NODE_DISPLAY_NAME_MAPPINGS = {{"{PACK_CLASS}": "Image test pass-through"}}
'''


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll until ``predicate()`` is truthy; fail with ``what`` (a callable gives the latest detail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


ENGINE_HOW = "start one with: docker/ci/engine.sh install && docker/ci/engine.sh start (root, Debian 12)"


def unavailable(why: str, how: str = ENGINE_HOW) -> None:
    """What an image test needs is missing: a skip that says what and how to get it -- except under CI
    (CI=true), where it must be there: a failure."""
    if in_ci():
        pytest.fail(f"image tests cannot run under CI: {why}; {how}", pytrace=False)
    pytest.skip(f"image tests cannot run: {why}; {how}")


# ------------------------------------------------------------------------------------------------ context


def stage_context(dest: Path, models_yaml: str, custom_nodes_txt: str,
                  extra_trees: dict[str, Path] | None = None) -> Path:
    """A copy of what the Dockerfile needs, laid out like the repository, with the test's two manifests.

    ``extra_trees`` (path in the context -> source folder) adds folders, e.g. a ComfyUI source for
    COMFYUI_SOURCE=local, and allows them in the context's .dockerignore (an allow-list) as users must."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    dest.mkdir(parents=True)
    for sub in ("docker", "supervisor", "scripts", "workflows", "tests/standin"):
        if (ROOT / sub).is_dir():
            shutil.copytree(ROOT / sub, dest / sub, ignore=ignore)
    for name in ("pyproject.toml", ".dockerignore"):
        shutil.copy2(ROOT / name, dest / name)
    (dest / "models.yaml").write_text(models_yaml)
    (dest / "custom_nodes.txt").write_text(custom_nodes_txt)
    if extra_trees:
        for where, source in extra_trees.items():
            shutil.copytree(source, dest / where, ignore=ignore, symlinks=True)
        # allowed before the trailing exclusions (**/__pycache__/ ...), which must still apply to them
        lines = (dest / ".dockerignore").read_text().splitlines()
        at = next((i for i, line in enumerate(lines) if line.startswith("**/")), len(lines))
        lines[at:at] = [f"!{where}/" for where in extra_trees]
        (dest / ".dockerignore").write_text("\n".join(lines) + "\n")
    return dest


# ------------------------------------------------------------------------------------------------ git pack


class GitPackServer:
    """A bare git repository with one node pack, served over git's dumb HTTP protocol on 127.0.0.1."""

    def __init__(self, root: Path, name: str = PACK_NAME, init_py: str = PACK_INIT) -> None:
        self.root = root
        self.name = name
        self.init_py = init_py
        self.commit = ""
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> GitPackServer:
        work = self.root / "work"
        bare = self.root / "serve" / f"{self.name}.git"
        work.mkdir(parents=True)
        (work / "__init__.py").write_text(self.init_py)
        (work / "requirements.txt").write_text("PyYAML\n")  # already in ComfyUI's venv: a no-op install
        env = {**os.environ, "GIT_AUTHOR_NAME": "image test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
               "GIT_COMMITTER_NAME": "image test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
        run(["git", "init", "-q", "-b", "main", str(work)])
        run(["git", "-C", str(work), "add", "-A"])
        run(["git", "-C", str(work), "commit", "-q", "-m", "image test node pack"], env=env)
        self.commit = run(["git", "-C", str(work), "rev-parse", "HEAD"]).stdout.strip()
        # A second commit after the pinned one: the build must check out the pin, not the branch head.
        (work / "LATER.txt").write_text("not at the pinned commit\n")
        run(["git", "-C", str(work), "add", "-A"])
        run(["git", "-C", str(work), "commit", "-q", "-m", "after the pin"], env=env)
        run(["git", "clone", "-q", "--bare", str(work), str(bare)])
        run(["git", "-C", str(bare), "update-server-info"])  # what the dumb HTTP protocol reads
        handler = functools.partial(_QuietHandler, directory=str(self.root / "serve"))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, name="git-pack-http", daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/{self.name}.git"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class GitDaemon:
    """`git daemon` (git://) on 127.0.0.1 serving bare repositories: the smart protocol, like GitHub's, which a
    shallow fetch of a tag or a commit needs (the Dockerfile's ComfyUI stage, the node installer)."""

    def __init__(self, root: Path) -> None:
        self.serve = root / "serve"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def add(self, name: str, source: Path | str) -> GitDaemon:
        """Serve a bare clone of ``source`` (a repository or a bundle) as ``<name>.git``."""
        run(["git", "clone", "-q", "--bare", str(source), str(self.serve / f"{name}.git")])
        return self

    def start(self) -> GitDaemon:
        self.serve.mkdir(parents=True, exist_ok=True)  # repositories can be added before or after
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._proc = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={self.serve}",
                                       "--listen=127.0.0.1", f"--port={self.port}", str(self.serve)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._listening, 10, f"git daemon on 127.0.0.1:{self.port}", interval=0.05)
        return self

    def _listening(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise AssertionError(f"git daemon exited with {self._proc.returncode} (serving {self.serve})")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}.git"

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, 5)
            self._proc = None


def stop_process(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``: a server the test started, by its own handle."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


STANDIN_RELEASE_TAG = "v0.0.1-imagetest"


def standin_release_repo(work: Path) -> str:
    """A git repository of the stand-in ComfyUI with a release tag and a commit after it; returns the tagged
    commit (what a build of COMFYUI_REF=<the tag> must contain)."""
    shutil.copytree(ROOT / "tests" / "standin", work, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, "GIT_AUTHOR_NAME": "image test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "image test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
    run(["git", "init", "-q", "-b", "master", str(work)])
    run(["git", "-C", str(work), "add", "-A"])
    run(["git", "-C", str(work), "commit", "-q", "-m", "ComfyUI stand-in"], env=env)
    run(["git", "-C", str(work), "tag", "-a", STANDIN_RELEASE_TAG, "-m", "a release"], env=env)
    tagged = run(["git", "-C", str(work), "rev-parse", "HEAD"]).stdout.strip()
    (work / "AFTER_THE_TAG.txt").write_text("not in the release\n")
    run(["git", "-C", str(work), "add", "-A"])
    run(["git", "-C", str(work), "commit", "-q", "-m", "after the release"], env=env)
    return tagged


# ------------------------------------------------------------------------------------------------ build


@dataclass
class Build:
    tag: str
    seconds: float
    log: str
    returncode: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


# The stand-in variant's build arguments: no torch, no extra system packages, the stand-in as ComfyUI.
STANDIN_VARIANT = (
    "--build-arg COMFYUI_SOURCE=local",
    "--build-arg COMFYUI_LOCAL_DIR=tests/standin",
    "--build-arg TORCH_PACKAGES=",
    "--build-arg SYSTEM_PACKAGES=",
    f"--build-arg 'COMFYUI_EXTRA_PACKAGES={STANDIN_PACKAGES}'",
)


def make_build_args(context: Path, tag: str, hub_endpoint: str, token_file: Path | None,
                    extra_args: tuple[str, ...] = (), extra_flags: tuple[str, ...] = (),
                    variant: tuple[str, ...] = STANDIN_VARIANT) -> list[str]:
    """The `make build` command line of a test variant (the same target users run)."""
    build_args = " ".join([*variant, f"--build-arg HF_ENDPOINT={hub_endpoint}", *extra_args])
    secrets = [f"HF_TOKEN_FILE={token_file}"] if token_file else []
    return ["make", "--no-print-directory", "-C", str(ROOT), "build",
            f"DOCKER={DOCKER_CLI}", f"IMAGE={IMAGE}", f"TAG={tag}", f"BASE_IMAGE={BASE_TAG}",
            f"CONTEXT={context}", "PROGRESS=plain", *secrets,
            f"BUILD_FLAGS={' '.join(('--network host', *extra_flags))}", f"BUILD_ARGS={build_args}"]


def run_build(cmd: list[str], log_path: Path, report: Callable[[str], None], timeout_s: float) -> Build:
    """Run the build, keep its whole log, report its steps as they start (long work shows progress)."""
    tag = next(a.split("=", 1)[1] for a in cmd if a.startswith("TAG="))
    started = time.monotonic()
    lines: list[str] = []
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    with log_path.open("w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, env=env) as proc:
        assert proc.stdout is not None
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                lines.append(line.rstrip("\n"))
                text = line.rstrip()
                step = _step_title(text)
                if step or text.startswith((">>", "make:", "build:")) or " >> " in text[:24]:
                    report(f"[{time.monotonic() - started:5.0f}s] {step or text}")
            proc.wait()
        finally:
            timer.cancel()
    return Build(tag=tag, seconds=time.monotonic() - started, log="\n".join(lines), returncode=proc.returncode)


def _step_title(line: str) -> str | None:
    """'#12 [image 4/12] RUN ...' lines of the plain progress output (a step starts), shortened."""
    if line.startswith("#") and " [" in line[:8] and "]" in line:
        return line if len(line) <= 150 else line[:147] + "..."
    return None


# ------------------------------------------------------------------------------------------------ inspection


def image_layers(client: Any, ref: str) -> list[str]:
    return list(client.images.get(ref).attrs["RootFS"]["Layers"])


def scan_saved_image(client: Any, ref: str, needle: bytes, workdir: Path) -> tuple[list[str], list[str]]:
    """`docker save REF` and search every file of the archive -- each layer's tar, the image config, the
    manifest -- for ``needle``, streaming with an overlap so a match across chunk borders is found.
    Returns (names of every file scanned, names of the files that contain the needle)."""
    archive = workdir / "image.tar"
    with archive.open("wb") as f:
        for chunk in client.images.get(ref).save(named=True):
            f.write(chunk)
    scanned: list[str] = []
    hits: list[str] = []
    try:
        with tarfile.open(archive) as outer:
            for member in outer:
                if not member.isfile():
                    continue
                scanned.append(member.name)
                stream = outer.extractfile(member)
                assert stream is not None
                tail = b""
                while chunk := stream.read(1 << 22):
                    if needle in tail + chunk:
                        hits.append(member.name)
                        break
                    tail = chunk[-len(needle):]
    finally:
        archive.unlink()
    return scanned, hits


def history_text(ref: str) -> str:
    """`docker history --no-trunc` of the image, every column, as the CLI prints it."""
    return run([DOCKER_CLI, "history", "--no-trunc", "--format", "{{json .}}", ref]).stdout


def shell(engine: Any, ref: str, script: str, **kw: Any) -> str:
    """Run a shell script in a throw-away container of the image (its entrypoint replaced) and return stdout."""
    out = engine.containers.run(ref, entrypoint=["/bin/sh", "-c", script], remove=True, stdout=True,
                                stderr=True, **kw)
    return out.decode()


def images_in(obj: Any) -> list[bytes]:
    """Every string in a response that decodes (plain base64 or a data URL) to a PNG, JPEG or WebP."""
    found: list[bytes] = []
    if isinstance(obj, dict):
        for value in obj.values():
            found += images_in(value)
    elif isinstance(obj, list):
        for value in obj:
            found += images_in(value)
    elif isinstance(obj, str) and len(obj) > 64:
        text = obj.split(",", 1)[1] if obj.startswith("data:") else obj
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return found
        if data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or data[8:12] == b"WEBP":
            found.append(data)
    return found


def post_json(url: str, body: dict[str, Any], key: str | None, timeout: float) -> tuple[int, Any]:
    """POST a JSON body (with a bearer key when given); returns the status and the decoded answer."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"null")
        except ValueError:
            return exc.code, raw.decode(errors="replace")


@dataclass
class Hub:
    server: Any  # tests.hubserver.harness.HubServer
    token: str
    files: dict[str, tuple[str, bytes]]  # destination (folder/filename) -> (sha256, content)
    private_path: str  # the resolve path of the private file, for the 401 check


@dataclass
class ImageUnderTest:
    ref: str
    context: Path
    build: Build
    make_cmd: list[str]
    token_file: Path
    workdir: Path


@dataclass
class Worker:
    container: Any
    api_key: str
    api_url: str


HEALTH_INTERVAL_NS = 500_000_000  # the image's own HEALTHCHECK command, probed faster than its 10 s default


def healthcheck_fast(image_ref: str, engine: Any) -> dict[str, Any]:
    """The image's own HEALTHCHECK command, with test timings (the command is what is under test)."""
    test = engine.images.get(image_ref).attrs["Config"]["Healthcheck"]["Test"]
    return {"test": test, "interval": HEALTH_INTERVAL_NS, "timeout": 10_000_000_000, "retries": 2,
            "start_period": 1_000_000}


@contextlib.contextmanager
def running_worker(engine: Any, image_ref: str, name: str, environment: dict[str, str],
                   report: Callable[[str], None]) -> Iterator[Worker]:
    """The image run as users run it self-hosted: the API on a loopback port, a fresh API_KEY, the image's own
    healthcheck probed fast; stopped (SIGTERM, the worker drains) and removed afterwards."""
    api_key = secrets.token_urlsafe(24)
    container = engine.containers.run(
        image_ref, detach=True, name=f"{name}-{uuid.uuid4().hex[:8]}",
        environment={"WORKER_MODE": "http", "API_KEY": api_key, "COMFYUI_ARGS": "--cpu", "LOG_LEVEL": "INFO",
                     **environment},
        ports={"8000/tcp": ("127.0.0.1", None)}, healthcheck=healthcheck_fast(image_ref, engine))
    try:
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"]
        report(f"{name} container {container.name} on 127.0.0.1:{port}")
        yield Worker(container=container, api_key=api_key, api_url=f"http://127.0.0.1:{port}")
    finally:
        try:
            container.stop(timeout=20)
        finally:
            container.remove(force=True)


def remove_images(engine: Any, *refs: str) -> None:
    """Remove the test's images (their layers stay in BuildKit's cache for the next run)."""
    for ref in refs:
        try:
            engine.images.remove(ref, noprune=False)
        except Exception:  # noqa: BLE001 - already gone, or still used by a container being removed
            pass


def health(container: Any) -> dict[str, Any]:
    container.reload()
    return container.attrs["State"].get("Health") or {}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
