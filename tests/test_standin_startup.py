"""Start-up and shutdown like ComfyUI: fast start, log lines, --quick-test-for-ci, SIGINT/SIGTERM, flags,
where files are written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.standin import STANDIN_DIR, STANDIN_MAIN, free_port, start_standin

pytestmark = pytest.mark.timeout(60)


def _tree_snapshot() -> set[str]:
    return {str(p.relative_to(STANDIN_DIR)) for p in STANDIN_DIR.rglob("*")}


def test_answers_system_stats_within_two_seconds_and_logs_like_comfyui(tmp_path: Path) -> None:
    before = _tree_snapshot()
    started = time.monotonic()
    sd = start_standin(tmp_path, wait=False)
    try:
        took = sd.wait_ready(timeout=10)
        ready_wall = time.time()
        assert took < 2.0, f"took {took:.2f}s"
        log = sd.log_text()
        for line in ("Total VRAM", "Device: cpu", "Import times for custom nodes:",
                     f"   0.0 seconds: {STANDIN_DIR / 'custom_nodes' / 'ComfyUI_IPAdapter_plus'}", "Starting server",
                     f"To see the GUI go to: http://127.0.0.1:{sd.port}"):
            assert line in log, line
        serving = re.search(r"^\[standin\] serving since (\d+\.\d{6})$", log, re.M)
        assert serving and started - 5 < float(serving.group(1)) <= ready_wall
        assert Path(sd.argv[sd.argv.index("--database-url") + 1][len("sqlite:///"):]).is_file()
    finally:
        sd.stop()
    assert _tree_snapshot() == before, "the stand-in wrote into its own source tree"


def test_sigint_stops_cleanly_and_removes_temp(tmp_path: Path) -> None:
    sd = start_standin(tmp_path)
    sd.temp_dir.mkdir(parents=True, exist_ok=True)
    (sd.temp_dir / "leftover.png").write_bytes(b"x")
    os.killpg(sd.proc.pid, signal.SIGINT)
    try:
        code = sd.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        sd.proc.kill()
        pytest.fail(f"the stand-in did not leave within 10 s of SIGINT; its log:\n{sd.log_text()[-2000:]}")
    assert code == 0
    assert "Stopped server" in sd.log_text()
    assert not sd.temp_dir.exists()


def test_temp_dir_is_wiped_at_start(tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    (stale / "temp").mkdir(parents=True)
    (stale / "temp" / "old.png").write_bytes(b"x")
    sd = start_standin(tmp_path, extra_args=["--temp-directory", str(stale)])
    try:
        assert not (stale / "temp" / "old.png").exists()
    finally:
        sd.stop()


def test_sigterm_kills_immediately(tmp_path: Path) -> None:
    sd = start_standin(tmp_path)
    sd.proc.send_signal(signal.SIGTERM)
    assert sd.proc.wait(timeout=5) == -signal.SIGTERM
    assert "Stopped server" not in sd.log_text()
    sd.stop()


def test_inherited_ignored_sigint_stays_ignored(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "user").mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(STANDIN_MAIN), "--port", str(port), "--cpu", "--temp-directory", str(tmp_path),
         "--user-directory", str(tmp_path / "user"), "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        _wait_http(port)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None, "SIGINT inherited as ignored must stay ignored"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_http(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError


def test_quick_test_for_ci_loads_everything_and_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "user").mkdir()
    out = subprocess.run(
        [sys.executable, str(STANDIN_MAIN), "--quick-test-for-ci", "--cpu", "--port", str(port),
         "--user-directory", str(tmp_path / "user"), "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}",
         "--temp-directory", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Import times for custom nodes:" in out.stderr
    assert "Starting server" not in out.stderr


def test_user_directory_must_exist(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(STANDIN_MAIN), "--user-directory", str(tmp_path / "missing"),
                          "--quick-test-for-ci"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "is not a valid directory" in out.stderr


def test_unknown_flags_are_ignored(tmp_path: Path) -> None:
    sd = start_standin(tmp_path, extra_args=["--fast", "--use-pytorch-cross-attention", "--reserve-vram", "1",
                                             "--preview-method", "auto", "--lowvram"])
    sd.stop()


def test_base_directory_moves_models_and_custom_nodes(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "m.safetensors").write_bytes(b"x")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "single.py").write_text(
        "class Single:\n    @classmethod\n    def INPUT_TYPES(cls):\n        return {'required': {}}\n"
        "    RETURN_TYPES = ()\n    FUNCTION = 'f'\n    OUTPUT_NODE = True\n    def f(self):\n        return {}\n"
        "NODE_CLASS_MAPPINGS = {'Single': Single}\n")
    sd = start_standin(tmp_path, use_extra_model_paths=False, extra_args=["--base-directory", str(base)])
    try:
        import json
        with urllib.request.urlopen(sd.url + "/models/checkpoints") as r:
            assert json.load(r) == ["m.safetensors"]
        with urllib.request.urlopen(sd.url + "/object_info/Single") as r:
            assert json.load(r)["Single"]["python_module"] == "custom_nodes.single"
        with urllib.request.urlopen(sd.url + "/object_info/IPAdapterModelLoader") as r:
            assert json.load(r) == {}  # the stand-in's own custom_nodes are not the base's
    finally:
        sd.stop()
