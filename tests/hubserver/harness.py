"""Start and drive tests/hubserver/server.py from Python (tests, benchmarks, the image test).

The server runs as its own process on loopback, so the code under test talks to a real socket exactly as it would
talk to huggingface.co or civitai.com.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

SERVER = Path(__file__).resolve().parent / "server.py"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes of a given size."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


class HubServer:
    """A running hub server process; use as a context manager."""

    def __init__(self, root: Path, *, cdn: bool = False, token: str | None = None, private: tuple[str, ...] = (),
                 gated: tuple[str, ...] = (), civitai_private: bool = False, civitai_token: str | None = None,
                 faults: dict[str, Any] | None = None, python: str = sys.executable) -> None:
        self.root = Path(root)
        self.args = [python, str(SERVER), "--root", str(self.root), "--host", "127.0.0.1", "--port", "0"]
        if cdn:
            self.args.append("--cdn")
        for repo in private:
            self.args += ["--private", repo]
        for repo in gated:
            self.args += ["--gated", repo]
        if civitai_private:
            self.args.append("--civitai-private")
        for name, value in (faults or {}).items():
            self.args += ["--fault", f"{name}={json.dumps(value)}"]
        self.env = dict(os.environ)
        if token:
            self.env["HUBSERVER_TOKEN"] = token  # by environment: it must not show in `ps`
        if civitai_token:
            self.env["HUBSERVER_CIVITAI_TOKEN"] = civitai_token
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.cdn_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"hub server did not start: {line!r}")
        ready = json.loads(line[6:])
        self.port, self.cdn_port = ready["port"], ready["cdn_port"]
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        self.proc = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.endpoint}/{path.lstrip('/')}"

    # ------------------------------------------------------------------ content

    def add_hf(self, repo: str, path: str, data: bytes) -> str:
        """Put a file into a Hub repository; returns its sha256."""
        return self._write(self.root / "hf" / repo / path, data)

    def add_file(self, path: str, data: bytes) -> str:
        """Put a file under /files/ (plain HTTP); returns its sha256."""
        return self._write(self.root / "files" / path, data)

    def add_civitai(self, version_id: int, filename: str, data: bytes) -> str:
        return self._write(self.root / "civitai" / str(version_id) / filename, data)

    def commit_of(self, repo: str) -> str:
        info = self._get(f"/api/models/{repo}")
        return info["sha"]

    @staticmethod
    def _write(path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return sha256_of(data)

    # ------------------------------------------------------------------ control

    def faults(self, **faults: Any) -> dict[str, Any]:
        return self._post("/_control/faults", faults)

    def reset(self) -> None:
        self._post("/_control/reset", {})

    def log(self) -> list[dict[str, Any]]:
        return self._get("/_control/log")

    def body_requests(self) -> list[dict[str, Any]]:
        """Logged GETs that returned file bytes (200/206), i.e. actual downloads."""
        return [e for e in self.log() if e["method"] == "GET" and e["status"] in (200, 206)
                and not e["path"].startswith(("/api/", "/_control"))]

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=10) as r:
            return json.loads(r.read())

    def _post(self, path: str, obj: dict[str, Any]) -> Any:
        req = urllib.request.Request(self.url(path), data=json.dumps(obj).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())


REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
TOKEN_VARS = ("HF_TOKEN", "CIVITAI_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUBSERVER_TOKEN", "HUBSERVER_CIVITAI_TOKEN")


def script_env(tmp: Path, server: HubServer | None = None, **extra: str) -> dict[str, str]:
    """An environment for running the build scripts against the loopback server, with no token leaking in."""
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_VARS and not k.startswith(("HF_", "FETCH_"))}
    env.update(HF_HOME=str(tmp / "hf-home"), SECRETS_DIR=str(tmp / "secrets"), FETCH_RETRY_WAIT_S="0",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    if server is not None:
        env.update(HF_ENDPOINT=server.endpoint, CIVITAI_ENDPOINT=server.endpoint)
    env.update(extra)
    return env


def run_script(name: str, args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run scripts/<name> with this interpreter, as the Docker build will; output captured as text."""
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
