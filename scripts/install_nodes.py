#!/usr/bin/env python3
"""Install the custom node packs of a custom_nodes.txt into a ComfyUI tree, then prove that every one imports.

    install_nodes.py --python /opt/venv/bin/python [--comfyui-dir D] [--list F] [--constraints F]
                     [--check server|quick|none] [--only-check] [--dry-run]

For each pack: clone at the pinned commit (branch and tag names are refused unless ALLOW_UNPINNED=true),
install its requirements.txt and extras into ComfyUI's interpreter (``--python``, never this script's) with a
constraints file that holds torch/torchvision/torchaudio at their installed versions, run its install.py if any.
Then start ComfyUI itself and fail, naming each pack, if one logged ``IMPORT FAILED`` or registered no node
class: a pack whose requirements went into the wrong interpreter, or whose import raises, would otherwise be
skipped silently by ComfyUI at run time (worker-comfyui #237).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from build_common import ConfigError, EnvReader, env_without  # noqa: E402
from manifest import ManifestError, NodePack, load_node_list  # noqa: E402

PROG = "install_nodes"
DEFAULT_LIST = HERE.parent / "custom_nodes.txt"
CHECK_MODES = ("server", "quick", "none")
DEFAULT_PROTECTED = ("torch", "torchvision", "torchaudio")
# Never handed to git, pip, install.py or ComfyUI: build secrets stay with the fetcher.
SECRET_VARS = ["HF_TOKEN", "CIVITAI_TOKEN", "HUGGING_FACE_HUB_TOKEN", "API_KEY", "BUCKET_SECRET_ACCESS_KEY"]


@dataclass(frozen=True)
class NodesConfig:
    """Every setting of the installer, read from the environment in one place; flags override it."""

    comfyui_dir: Path = Path("/opt/ComfyUI")
    python: str | None = None
    node_list: Path = DEFAULT_LIST
    constraints: Path | None = None
    allow_unpinned: bool = False
    protected: tuple[str, ...] = DEFAULT_PROTECTED
    check: str = "server"
    check_timeout_s: float = 600.0
    install_timeout_s: float = 1800.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NodesConfig:
        r = EnvReader(env)
        check = r.string("NODES_CHECK", "server").lower()
        if check not in CHECK_MODES:
            r.problems.append(f"NODES_CHECK={check!r} is not valid; accepted: {', '.join(CHECK_MODES)}")
            check = "server"
        protected = tuple(p for p in re.split(r"[\s,]+", r.string("PROTECTED_PACKAGES", " ".join(DEFAULT_PROTECTED)))
                          if p)
        cfg = cls(
            comfyui_dir=r.path("COMFYUI_DIR", Path("/opt/ComfyUI")) or Path("/opt/ComfyUI"),
            python=r.raw("COMFYUI_PYTHON"),
            node_list=r.path("CUSTOM_NODES_LIST", DEFAULT_LIST) or DEFAULT_LIST,
            constraints=r.path("NODES_CONSTRAINTS", None),
            allow_unpinned=r.boolean("ALLOW_UNPINNED", False),
            protected=protected,
            check=check,
            check_timeout_s=r.number("NODES_CHECK_TIMEOUT_S", 600.0, 1, 7200),
            install_timeout_s=r.number("NODES_INSTALL_TIMEOUT_S", 1800.0, 1, 7200),
        )
        r.finish()
        return cfg


class InstallError(Exception):
    """One pack could not be installed; the message names it and says what failed."""


def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


# ------------------------------------------------------------------------------------------------ subprocesses


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for git, pip, install.py and ComfyUI: no build secrets, no interactive prompts."""
    env = env_without(SECRET_VARS)
    env.update(GIT_TERMINAL_PROMPT="0", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run(cmd: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None, timeout: float = 600,
        prefix: str = "") -> tuple[int, str]:
    """Run a command, echoing its output with a prefix; returns (exit code, output)."""
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env or child_env()), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as exc:
        return 127, f"cannot run {cmd[0]}: {exc}"
    lines: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if prefix:
                print(f"{prefix}{line}", end="", flush=True)
        code = proc.wait()
    finally:
        timer.cancel()
    output = "".join(lines)
    if code < 0:
        output += f"\n(killed after {timeout:.0f}s)" if code == -signal.SIGKILL else f"\n(signal {-code})"
    return code, output


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


# ------------------------------------------------------------------------------------------------ git


def git(args: list[str], cwd: Path | None = None, timeout: float = 600) -> tuple[int, str]:
    return run(["git", "-c", "advice.detachedHead=false", *args], cwd=cwd, timeout=timeout)


def checkout(pack: NodePack, dest: Path, timeout: float) -> str:
    """Make ``dest`` a checkout of the pack at its ref; returns the commit. Idempotent for a pinned pack."""
    if dest.exists() and not (dest / ".git").exists():
        raise InstallError(f"{pack.label}: {dest} exists and is not a git checkout; remove it or rename the pack")
    if (dest / ".git").exists():
        code, head = git(["rev-parse", "HEAD"], dest)
        if code == 0 and pack.pinned and head.strip() == pack.ref:
            return pack.ref
        code, dirty = git(["status", "--porcelain", "--untracked-files=no"], dest)
        if code != 0 or dirty.strip():
            raise InstallError(f"{pack.label}: {dest} has local changes; refusing to move it to {pack.ref}")
        git(["remote", "set-url", "origin", pack.url], dest)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        code, out = git(["init", "-q", str(dest)])
        if code != 0:
            raise InstallError(f"{pack.label}: git init failed: {last_line(out)}")
        git(["remote", "add", "origin", pack.url], dest)
    code, out = git(["fetch", "-q", "--depth", "1", "origin", pack.ref], dest, timeout)
    if code != 0 and pack.pinned:  # a server that refuses fetching a commit by id: fetch everything, then pick it
        code, out = git(["fetch", "-q", "origin"], dest, timeout)
    if code != 0:
        raise InstallError(f"{pack.label}: cannot fetch {pack.ref} from {pack.url}: {last_line(out)}")
    target = pack.ref if pack.pinned else "FETCH_HEAD"
    code, out = git(["checkout", "-q", "--detach", target], dest)
    if code != 0:
        raise InstallError(f"{pack.label}: cannot check out {pack.ref}: {last_line(out)}")
    _, head = git(["rev-parse", "HEAD"], dest)
    commit = head.strip()
    if pack.pinned and commit != pack.ref:
        raise InstallError(f"{pack.label}: checked out {commit}, not the pinned {pack.ref}")
    if (dest / ".gitmodules").exists():
        code, out = git(["submodule", "update", "--init", "--recursive", "--depth", "1"], dest, timeout)
        if code != 0:
            raise InstallError(f"{pack.label}: submodules failed: {last_line(out)}")
    return commit


# ------------------------------------------------------------------------------------------------ pip


def installed_versions(python: str, names: tuple[str, ...]) -> dict[str, str | None]:
    """Versions of distributions in ComfyUI's interpreter (None when not installed)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))\n")
    status, output = run([python, "-c", code, *names], timeout=120)
    if status != 0:
        raise InstallError(f"cannot run ComfyUI's interpreter {python}: {last_line(output)}")
    return json.loads(output.strip().splitlines()[-1])


def write_constraints(path: Path, pins: dict[str, str | None], extra: Path | None) -> None:
    """The constraints every pip call (ours and install.py's, via PIP_CONSTRAINT) must respect."""
    lines = ["# written by install_nodes.py: packages ComfyUI's interpreter must keep as they are"]
    lines += [f"{name}=={version}" for name, version in pins.items() if version]
    if extra is not None:
        lines += ["", f"# from {extra}", extra.read_text(encoding="utf-8")]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def pip_install(pack: NodePack, dest: Path, python: str, env: Mapping[str, str], timeout: float) -> bool:
    """Install requirements.txt and the extras into ComfyUI's interpreter; False when there is nothing to do."""
    args: list[str] = []
    requirements = dest / "requirements.txt"
    if requirements.is_file() and _has_requirements(requirements):
        args += ["-r", str(requirements)]
    args += list(pack.extras)
    if not args:
        return False
    say(f"{pack.name}: pip install {' '.join(a if a != str(requirements) else 'requirements.txt' for a in args)}")
    code, out = run([python, "-m", "pip", "install", *args], cwd=dest, env=env, timeout=timeout,
                    prefix=f"  [{pack.name}] ")
    if code != 0:
        raise InstallError(f"{pack.label}: pip install into {python} failed (exit {code}): {_pip_reason(out)}")
    return True


def _has_requirements(path: Path) -> bool:
    return any(ln.strip() and not ln.strip().startswith("#") for ln in path.read_text(errors="replace").splitlines())


def _pip_reason(output: str) -> str:
    """The line of pip's output that says why, rather than its last line (often a hint), plus any held package."""
    reason = next((ln[6:].strip() for ln in output.splitlines() if ln.startswith("ERROR:")), last_line(output))
    held = [ln.split("(constraint)", 1)[1].strip() for ln in output.splitlines() if "(constraint)" in ln]
    if held:
        reason += f" (held by the constraints: {', '.join(held)})"
    return reason


def run_install_script(pack: NodePack, dest: Path, python: str, env: Mapping[str, str], timeout: float) -> bool:
    script = dest / "install.py"
    if not script.is_file():
        return False
    say(f"{pack.name}: running install.py")
    code, out = run([python, str(script)], cwd=dest, env=env, timeout=timeout, prefix=f"  [{pack.name}] ")
    if code != 0:
        raise InstallError(f"{pack.label}: install.py failed (exit {code}): {last_line(out)}")
    return True


# ------------------------------------------------------------------------------------------------ import check


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
            classes = None if quick else _object_info_counts(proc, port, cfg.check_timeout_s, lines)
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
    return report


def _object_info_counts(proc: subprocess.Popen[str], port: int, timeout: float, lines: list[str]) -> dict[str, int]:
    """Node classes per custom node directory, from /object_info's python_module (custom_nodes.<dir>)."""
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
    return counts


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


# ------------------------------------------------------------------------------------------------ commands


def install(cfg: NodesConfig, python: str, packs: list[NodePack]) -> list[str]:
    """Clone, pip-install and run install.py for each pack; returns one problem line per failed pack."""
    custom_nodes = cfg.comfyui_dir / "custom_nodes"
    protected = installed_versions(python, cfg.protected)
    shown = ", ".join(f"{n} {v}" for n, v in protected.items() if v) or "none of them installed"
    say(f"ComfyUI's interpreter: {python}; holding {shown}")
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nodes-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        write_constraints(constraints, protected, cfg.constraints)
        env = child_env({"PIP_CONSTRAINT": str(constraints)})
        for pack in packs:
            try:
                commit = checkout(pack, custom_nodes / pack.name, cfg.install_timeout_s)
                if not pack.pinned:
                    say(f"warning: {pack.label}: unpinned ref {pack.ref!r} resolved to {commit}; pin it as "
                        f"{pack.url}@{commit}")
                say(f"{pack.name}: at {commit}")
                pip_install(pack, custom_nodes / pack.name, python, env, cfg.install_timeout_s)
                run_install_script(pack, custom_nodes / pack.name, python, env, cfg.install_timeout_s)
            except InstallError as exc:
                problems.append(str(exc))
                say(f"FAILED {exc}")
    after = installed_versions(python, cfg.protected)
    for name, version in protected.items():
        if after.get(name) != version:
            problems.append(f"{name} changed from {version} to {after.get(name)} in {python} while installing the "
                            "node packs (something installed it without the constraints)")
    return problems


def cmd_main(cfg: NodesConfig, python: str | None, packs: list[NodePack], only_check: bool, dry_run: bool) -> int:
    if dry_run:
        for pack in packs:
            extras = f" + pip {' '.join(pack.extras)}" if pack.extras else ""
            print(f"  {pack.label}: {pack.url} @ {pack.ref} -> {cfg.comfyui_dir / 'custom_nodes' / pack.name}{extras}")
        print(f"total: {len(packs)} pack(s); import check: {cfg.check}")
        return 0
    if python is None:
        say("error: say which interpreter runs ComfyUI: --python PATH or COMFYUI_PYTHON (packs' requirements go "
            "there, never into this script's interpreter)")
        return 2
    if not (cfg.comfyui_dir / "main.py").is_file():
        say(f"error: {cfg.comfyui_dir} has no main.py; point --comfyui-dir (COMFYUI_DIR) at the ComfyUI tree")
        return 2
    problems = [] if only_check else install(cfg, python, packs)
    if problems:
        say(f"error: {len(problems)} node pack(s) failed to install:")
        for problem in problems:
            print(f"  - {problem}", flush=True)
        return 1
    if cfg.check == "none":
        say("import check skipped (NODES_CHECK=none)")
        return 0
    try:
        report = check_imports(cfg, python)
    except InstallError as exc:
        say(f"error: the import check could not run: {exc}")
        return 1
    problems = judge(packs, report)
    for name, reason in sorted(report.failed.items()):
        if name not in {p.name for p in packs}:
            say(f"warning: custom_nodes/{name} (not in the list) failed to import: {reason}")
    if problems:
        say(f"error: {len(problems)} node pack(s) failed the import check:")
        for problem in problems:
            print(f"  - {problem}", flush=True)
        return 1
    for pack in packs:
        count = "" if report.classes is None else f" ({report.classes.get(pack.name, 0)} node classes)"
        say(f"imports: {pack.name}{count}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = NodesConfig.from_env(os.environ)
    except ConfigError as exc:
        say(f"error: {exc}")
        return 2
    p = argparse.ArgumentParser(prog="install_nodes.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui-dir", type=Path, default=cfg.comfyui_dir, help=f"default {cfg.comfyui_dir}")
    p.add_argument("--python", default=cfg.python, help="ComfyUI's interpreter (default: COMFYUI_PYTHON; required)")
    p.add_argument("--list", type=Path, default=cfg.node_list, help=f"default {cfg.node_list}")
    p.add_argument("--constraints", type=Path, default=cfg.constraints, help="extra pip constraints for every pack")
    p.add_argument("--check", choices=CHECK_MODES, default=cfg.check, help=f"import check (default {cfg.check})")
    p.add_argument("--only-check", action="store_true", help="skip installing; only run the import check")
    p.add_argument("--dry-run", action="store_true", help="print the packs and exit")
    args = p.parse_args(argv)
    cfg = dataclasses.replace(cfg, comfyui_dir=args.comfyui_dir.resolve(), node_list=args.list,
                              constraints=args.constraints, check=args.check)
    try:
        packs = load_node_list(cfg.node_list, cfg.allow_unpinned)
    except ManifestError as exc:
        say(f"error: {exc}")
        return 2
    return cmd_main(cfg, args.python, packs, args.only_check, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
