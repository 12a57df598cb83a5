"""The proof that every node pack imports: start ComfyUI on the CPU in a scratch dir, read its custom node import
log (and, in server mode, the node classes of /object_info), and name each pack that failed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..manifest import NodePack
from .config import InstallError, NodesConfig, say
from .procs import child_env, last_line

IMPORT_TIME_RE = re.compile(r"^\s*[\d.]+ seconds(?P<failed> \(IMPORT FAILED\))?: (?P<path>.+?)\s*$")
CANNOT_IMPORT_RE = re.compile(r"Cannot import (?P<path>.+?) module for custom nodes: (?P<err>.*)$")
SKIPPED_RE = re.compile(r"Skip (?P<path>.+?) module for custom nodes due to the lack of NODE_CLASS_MAPPINGS")
EXCEPTION_LINE_RE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)(?::.*)?$")


@dataclass
class ImportReport:
    """What ComfyUI said about each custom node directory (keyed by directory name)."""

    loaded: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    classes: dict[str, int] | None = None  # from /object_info; None in quick mode
    server: str = ""  # which ComfyUI answered (versions, node class count); empty in quick mode
    log: str = ""


def parse_import_log(log: str) -> ImportReport:
    """Read ComfyUI's custom node import block and its 'Cannot import' lines."""
    report = ImportReport(log=log)
    last_exception = ""
    in_block = False
    for raw in log.splitlines():
        line = raw.rstrip()
        if EXCEPTION_LINE_RE.match(line.strip()):
            last_exception = line.strip()
        if m := CANNOT_IMPORT_RE.search(line):
            name = Path(m["path"]).name
            reason = last_exception if last_exception and m["err"] in last_exception else m["err"]
            report.failed[name] = reason or "import raised an exception"
            last_exception = ""
        elif m := SKIPPED_RE.search(line):
            report.failed.setdefault(Path(m["path"]).name, "it defines no NODE_CLASS_MAPPINGS")
        if "Import times for custom nodes:" in line:
            in_block = True
            continue
        if in_block:
            m = IMPORT_TIME_RE.match(line)
            if not m:
                in_block = bool(line.strip())  # the block ends at its blank line
                continue
            name = Path(m["path"]).name
            if m["failed"]:
                report.failed.setdefault(name, "IMPORT FAILED (see the log above)")
            else:
                report.loaded.add(name)
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfyui_command(cfg: NodesConfig, python: str, scratch: Path, quick: bool, port: int) -> list[str]:
    """ComfyUI on the CPU with every writable path in a scratch dir, so the check leaves no trace in the image."""
    for sub in ("user", "output", "input"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    cmd = [python, str(cfg.comfyui_dir / "main.py"), "--cpu", "--disable-auto-launch",
           "--temp-directory", str(scratch), "--user-directory", str(scratch / "user"),
           "--output-directory", str(scratch / "output"), "--input-directory", str(scratch / "input"),
           "--database-url", f"sqlite:///{scratch / 'comfyui.db'}"]
    if quick:
        return [*cmd, "--quick-test-for-ci"]
    return [*cmd, "--listen", "127.0.0.1", "--port", str(port)]


def check_imports(cfg: NodesConfig, python: str) -> ImportReport:
    """Start ComfyUI and read what it says about the custom nodes (and, in server mode, /object_info)."""
    quick = cfg.check == "quick"
    with tempfile.TemporaryDirectory(prefix="comfyui-check-") as tmp:
        port = free_port()
        cmd = comfyui_command(cfg, python, Path(tmp), quick, port)
        say(f"import check: starting ComfyUI ({'--quick-test-for-ci' if quick else '/object_info'})")
        proc = subprocess.Popen(cmd, cwd=cfg.comfyui_dir, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
        reader.start()
        try:
            classes, server = ((None, "") if quick
                               else _object_info_counts(proc, port, cfg.check_timeout_s, lines))
            if quick:
                try:
                    code = proc.wait(timeout=cfg.check_timeout_s)
                except subprocess.TimeoutExpired:
                    raise InstallError(f"ComfyUI --quick-test-for-ci did not finish in {cfg.check_timeout_s:.0f}s") from None
                if code != 0:
                    raise InstallError(f"ComfyUI --quick-test-for-ci exited with {code}: {last_line(''.join(lines))}")
        finally:
            _stop(proc)
            reader.join(timeout=5)
    report = parse_import_log("".join(lines))
    report.classes = classes
    report.server = server
    return report


def _object_info_counts(proc: subprocess.Popen[str], port: int, timeout: float,
                        lines: list[str]) -> tuple[dict[str, int], str]:
    """Node classes per custom node directory, from /object_info's python_module (custom_nodes.<dir>), and
    which ComfyUI answered (_server_summary)."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/object_info"
    while True:
        if proc.poll() is not None:
            raise InstallError(f"ComfyUI exited with {proc.returncode} during the import check: "
                               f"{last_line(''.join(lines))}")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                info = json.loads(r.read())
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            if time.monotonic() > deadline:
                raise InstallError(f"ComfyUI did not serve /object_info within {timeout:.0f}s") from None
            time.sleep(0.2)
    counts: dict[str, int] = {}
    for node in info.values():
        module = str(node.get("python_module", ""))
        if module.startswith("custom_nodes."):
            name = module.split(".", 1)[1].split(".")[0]
            counts[name] = counts.get(name, 0) + 1
    return counts, _server_summary(port, len(info))


def _server_summary(port: int, node_classes: int) -> str:
    """The ComfyUI and torch versions /system_stats reports and the node class count: the build log's record of
    which ComfyUI the packs were checked against (a wrong tree or a torch-less venv shows here)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=30) as r:
            system = json.loads(r.read()).get("system") or {}
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, AttributeError):
        system = {}
    return (f"ComfyUI {system.get('comfyui_version', '(version unknown)')}, "
            f"torch {system.get('pytorch_version', '(unknown)')}, {node_classes} node classes")


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGINT (ComfyUI's clean exit), then SIGTERM, then SIGKILL, to the whole process group."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def judge(packs: list[NodePack], report: ImportReport) -> list[str]:
    """One problem per pack that failed to import, was not loaded, or registered no class."""
    problems = []
    for pack in packs:
        if pack.name in report.failed:
            problems.append(f"{pack.label}: IMPORT FAILED: {report.failed[pack.name]}")
        elif report.classes is not None and report.classes.get(pack.name, 0) == 0:
            why = "imported but registered no node class" if pack.name in report.loaded else "was not loaded"
            problems.append(f"{pack.label}: {why} (no class with python_module custom_nodes.{pack.name} in "
                            "/object_info)")
        elif report.classes is None and pack.name not in report.loaded:
            problems.append(f"{pack.label}: not in ComfyUI's custom node import list")
    return problems
