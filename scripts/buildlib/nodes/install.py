"""Installing custom node packs: clone each at its pinned commit, install its requirements and extras into
ComfyUI's interpreter under constraints that hold torch as it is, run its install.py; then the import check."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..common import without_credentials, write_record
from ..manifest import NodePack
from .config import InstallError, NodesConfig, say
from .import_check import check_imports, judge
from .procs import child_env, last_line, run

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
    """The line of pip's output that says why, rather than its last line (often a hint), plus any held package.

    When a held package (torch, what TORCH_PACKAGES installed) is in the conflict, the reason names the pack's
    requirements that would replace it, from pip's "The conflict is caused by" lines."""
    lines = [ln.strip() for ln in output.splitlines()]
    reason = next((ln[6:].strip() for ln in lines if ln.startswith("ERROR:")), last_line(output))
    held = [ln.split("(constraint)", 1)[1].strip() for ln in lines if "(constraint)" in ln]
    if not held:
        return reason
    names = {re.split(r"[<>=!~;\[ ]", h, maxsplit=1)[0].lower() for h in held}
    wants = [ln.removeprefix("The user requested ").strip() for ln in lines
             if ("The user requested " in ln and "(constraint)" not in ln) or " depends on " in ln]
    wants = [w for w in wants if any(re.search(rf"(^|\s){re.escape(n)}([<>=!~;\[ ]|$)", w.lower()) for n in names)]
    if wants:
        return (f"its requirements would replace {', '.join(held)}, which the build holds: {'; '.join(wants)} "
                "(pin a version of the pack that works with it, or change TORCH_PACKAGES)")
    return reason + f" (held by the constraints: {', '.join(held)})"


def run_install_script(pack: NodePack, dest: Path, python: str, env: Mapping[str, str], timeout: float) -> bool:
    script = dest / "install.py"
    if not script.is_file():
        return False
    say(f"{pack.name}: running install.py")
    code, out = run([python, str(script)], cwd=dest, env=env, timeout=timeout, prefix=f"  [{pack.name}] ")
    if code != 0:
        raise InstallError(f"{pack.label}: install.py failed (exit {code}): {last_line(out)}")
    return True


# ------------------------------------------------------------------------------------------------ the packs


def install(cfg: NodesConfig, python: str, packs: list[NodePack],
            installed: list[dict[str, str]] | None = None) -> list[str]:
    """Clone, pip-install and run install.py for each pack; returns one problem line per failed pack.

    ``installed`` receives each installed pack's name, URL (without credentials) and commit."""
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
                if installed is not None:
                    installed.append({"name": pack.name, "url": without_credentials(pack.url), "commit": commit})
            except InstallError as exc:
                problems.append(str(exc))
                say(f"FAILED {exc}")
    after = installed_versions(python, cfg.protected)
    for name, version in protected.items():
        if after.get(name) != version:
            problems.append(f"{name} changed from {version} to {after.get(name)} in {python} while installing the "
                            "node packs (something installed it without the constraints)")
    return problems


def cmd_install(cfg: NodesConfig, python: str | None, packs: list[NodePack], only_check: bool, dry_run: bool,
                record: Path | None = None) -> int:
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
    if record is not None and only_check:
        say("error: --record lists what an install installed; it cannot go with --only-check")
        return 2
    installed: list[dict[str, str]] = []
    problems = [] if only_check else install(cfg, python, packs, installed)
    if problems:
        say(f"error: {len(problems)} node pack(s) failed to install:")
        for problem in problems:
            print(f"  - {problem}", flush=True)
        return 1
    code = import_check(cfg, python, packs)
    if code == 0 and record is not None:
        write_record(record, {"custom_nodes": installed})
        say(f"recorded {len(installed)} pack(s) with their commits in {record}")
    return code


def import_check(cfg: NodesConfig, python: str, packs: list[NodePack]) -> int:
    """Start ComfyUI and judge every pack by what it logged and registered (NODES_CHECK); the exit code."""
    if cfg.check == "none":
        say("import check skipped (NODES_CHECK=none)")
        return 0
    try:
        report = check_imports(cfg, python)
    except InstallError as exc:
        say(f"error: the import check could not run: {exc}")
        return 1
    if report.server:
        say(f"import check: answered by {report.server}")
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
