#!/usr/bin/env python3
"""Prepare the real ComfyUI for tests and benchmarks: source, node packs and a CPU venv, cached per machine.

    real_comfyui.py [--upstream DIR] [--cache DIR] [--python PY] [--rebuild]   build (or reuse), print its dir
    real_comfyui.py --locate                                                  print the dir if prepared, else exit 1

Made from ``../shared/upstream/`` (never copied into the repository): the ComfyUI source tarball is unpacked,
every pack of ``custom_nodes.txt`` is installed by the project's own node installer (``scripts/install_nodes.py``)
from a ``file://`` mirror of its git bundle at the commit ``custom_nodes.txt`` pins, and a venv gets the pinned
torch triple and ComfyUI's requirements. The installer's import check then starts this ComfyUI once and proves
every pack imports.

The result lives in ``<cache>/<key>/`` (``ComfyUI/``, ``venv/``, ``ready.json``), where the key hashes every
input: the tarball, the bundles, the pack pins, the torch pins and the Python version. A fresh clone on the same
machine finds it again; a changed input makes a new key. ``ready.json`` is written last, so a build that was cut
off is redone, and a lock file keeps two builds of one key from running at once.

Settings (flags override them): ``REAL_COMFYUI_UPSTREAM`` (default ``<repo>/../shared/upstream``),
``REAL_COMFYUI_CACHE`` (default ``~/.cache/comfyui-worker/real-comfyui``), ``TORCH_INDEX_URL`` (empty: pip's
default index). Standard library only.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from buildlib.manifest import ManifestError, NodePack, load_node_list  # noqa: E402

PROG = "real-comfyui"
# A matching triple: newer torch with this torchaudio breaks ComfyUI 0.3.64's audio/video nodes
# (../shared/upstream/README.md). The == pins also keep pip away from other torch wheels in local find-links.
TORCH_PINS = ("torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.1")
# ComfyUI imports requests without listing it in its requirements.txt.
EXTRA_REQUIREMENTS = ("requests",)
# Bumped when the layout of a prepared dir or the way it is built changes: old entries are then not reused.
LAYOUT = 1
NOT_PREPARED = "the real ComfyUI is not prepared: run `make real-comfyui` (needs ../shared/upstream/, ~3 GB download)"


class BuildError(Exception):
    """One step failed; the message says which and why."""


@dataclass(frozen=True)
class Options:
    """Where the inputs are and where the result goes, read from the environment once; flags override it."""

    upstream: Path
    cache: Path
    python: str
    torch_index_url: str | None
    node_list: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Options:
        cache_home = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cls(
            upstream=Path(env.get("REAL_COMFYUI_UPSTREAM") or ROOT.parent / "shared" / "upstream"),
            cache=Path(env.get("REAL_COMFYUI_CACHE") or cache_home / "comfyui-worker" / "real-comfyui"),
            python=sys.executable,
            torch_index_url=env.get("TORCH_INDEX_URL") or None,
            node_list=ROOT / "custom_nodes.txt",
        )


@dataclass(frozen=True)
class Inputs:
    """Everything that decides what a build contains, and the key that names it."""

    tarball: Path
    bundles: dict[str, Path]  # pack name -> its git bundle
    packs: tuple[NodePack, ...]
    python_version: str
    key: str
    description: dict


@dataclass(frozen=True)
class Prepared:
    """A finished build: the ComfyUI tree and the interpreter that runs it."""

    root: Path
    comfyui_dir: Path
    python: Path
    info: dict


def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def interpreter_version(python: str) -> str:
    """``CPython 3.11.7`` of the interpreter that will create the venv (not necessarily this one)."""
    code = "import platform; print(platform.python_implementation(), platform.python_version())"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip()


def read_inputs(opts: Options) -> Inputs:
    """Find the tarball and one bundle per pinned pack in the upstream folder; hash them into the key."""
    if not opts.upstream.is_dir():
        raise BuildError(f"no upstream folder {opts.upstream}: it holds the ComfyUI tarball and the node pack "
                         "bundles (set REAL_COMFYUI_UPSTREAM or --upstream)")
    tarballs = sorted(opts.upstream.glob("comfyui-*.tar.gz"))
    if len(tarballs) != 1:
        raise BuildError(f"{opts.upstream} must hold exactly one comfyui-*.tar.gz, found "
                         f"{[t.name for t in tarballs] or 'none'}")
    try:
        packs = tuple(load_node_list(opts.node_list))
    except ManifestError as exc:
        raise BuildError(str(exc)) from None
    bundles = {}
    for pack in packs:
        bundle = opts.upstream / f"{pack.name}-{pack.ref[:7]}.bundle"
        if not bundle.is_file():
            raise BuildError(f"{pack.label}: no git bundle {bundle.name} in {opts.upstream} for the pinned commit "
                             f"{pack.ref}")
        bundles[pack.name] = bundle
    python_version = interpreter_version(opts.python)
    description = {
        "layout": LAYOUT,
        "tarball": {"name": tarballs[0].name, "sha256": sha256_file(tarballs[0])},
        "packs": [{"name": p.name, "ref": p.ref, "extras": list(p.extras),
                   "bundle_sha256": sha256_file(bundles[p.name])} for p in packs],
        "pins": [*TORCH_PINS, *EXTRA_REQUIREMENTS],
        "python": python_version,
        "machine": platform.machine(),
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return Inputs(tarballs[0], bundles, packs, python_version, key, description)


def locate(opts: Options, inputs: Inputs | None = None) -> Prepared | None:
    """The finished build for these inputs, or None when it has not been made (or was cut off)."""
    inputs = inputs or read_inputs(opts)
    root = opts.cache / inputs.key
    try:
        info = json.loads((root / "ready.json").read_text())
    except (OSError, ValueError):
        return None
    python = root / "venv" / "bin" / "python"
    if info.get("key") != inputs.key or not python.exists() or not (root / "ComfyUI" / "main.py").is_file():
        return None
    return Prepared(root, root / "ComfyUI", python, info)


# ------------------------------------------------------------------------------------------------ building


class Steps:
    """Numbered progress lines, one per step, each with its time; output of commands goes to build.log."""

    def __init__(self, total: int, log: Path) -> None:
        self.total = total
        self.n = 0
        self.log = log
        self.times: dict[str, float] = {}

    @contextmanager
    def step(self, name: str, what: str) -> Iterator[None]:
        self.n += 1
        say(f"[{self.n}/{self.total}] {what} ...")
        started = time.monotonic()
        yield
        self.times[name] = round(time.monotonic() - started, 1)
        say(f"[{self.n}/{self.total}] {what}: done in {self.times[name]:.1f} s")

    def run(self, cmd: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
            echo: bool = False) -> None:
        """Run a command, its output appended to build.log (and echoed when asked); raise with its last lines."""
        with self.log.open("a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env or os.environ), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace")
            tail: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-15:]
                if echo:
                    print(f"    {line}", end="", flush=True)
            code = proc.wait()
        if code != 0:
            shown = "\n".join(f"    {line}" for line in tail)
            raise BuildError(f"`{' '.join(cmd[:4])} ...` failed (exit {code}); the full output is in {self.log}:\n"
                             f"{shown}")


def unpack(tarball: Path, dest: Path) -> Path:
    """Unpack the source tarball (one folder ``ComfyUI/``) into ``dest``."""
    with tarfile.open(tarball) as tar:
        tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        if tops != {"ComfyUI"}:
            raise BuildError(f"{tarball.name} must hold one folder ComfyUI/, holds {sorted(tops)[:5]}")
        tar.extractall(dest, filter="data")
    return dest / "ComfyUI"


def mirror_packs(inputs: Inputs, git_dir: Path) -> Path:
    """A bare repository per bundle, and a custom_nodes list that names them by ``file://`` at the same pins."""
    lines = ["# written by scripts/real_comfyui.py: custom_nodes.txt with each pack served from its bundle"]
    for pack in inputs.packs:
        bare = git_dir / f"{pack.name}.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(inputs.bundles[pack.name]), str(bare)], check=True,
                       capture_output=True)
        lines.append(" ".join([f"file://{bare}@{pack.ref}", *pack.extras]))
    listing = git_dir / "custom_nodes.txt"
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return listing


def build(opts: Options, inputs: Inputs, root: Path) -> Prepared:
    """Every step, in ``root`` (emptied first); ``ready.json`` last."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    steps = Steps(5, root / "build.log")
    venv = root / "venv"
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check"]
    index = ["--index-url", opts.torch_index_url] if opts.torch_index_url else []
    with steps.step("unpack", f"unpack {inputs.tarball.name}"):
        comfyui_dir = unpack(inputs.tarball, root)
    with steps.step("venv", f"create a venv with {inputs.python_version}"):
        steps.run([opts.python, "-m", "venv", str(venv)])
    with steps.step("torch", f"pip install {' '.join(TORCH_PINS)} (~3 GB the first time)"):
        steps.run([*pip, *index, *TORCH_PINS])
    with steps.step("requirements", "pip install ComfyUI's requirements.txt"):
        steps.run([*pip, "-r", str(comfyui_dir / "requirements.txt"), *EXTRA_REQUIREMENTS, *TORCH_PINS])
    with steps.step("nodes", f"install {', '.join(p.name for p in inputs.packs)} with scripts/install_nodes.py "
                             "and check that it imports"):
        listing = mirror_packs(inputs, root / "git")
        steps.run([sys.executable, str(ROOT / "scripts" / "install_nodes.py"), "--python", str(python),
                   "--comfyui-dir", str(comfyui_dir), "--list", str(listing), "--check", "server"], echo=True)
    torch_version = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    info = {"key": inputs.key, "inputs": inputs.description, "torch": torch_version,
            "torch_index_url": opts.torch_index_url or "pip's default", "step_seconds": steps.times,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = root / "ready.json.tmp"
    tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    tmp.replace(root / "ready.json")
    return Prepared(root, comfyui_dir, python, info)


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """One build per key at a time, across processes (another checkout may be building the same key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another build of {path.stem} is running; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def prepare(opts: Options, rebuild: bool = False) -> Prepared:
    """The cached build for these inputs, made first when missing."""
    started = time.monotonic()
    say(f"inputs from {opts.upstream}; cache {opts.cache}")
    inputs = read_inputs(opts)
    with build_lock(opts.cache / f"{inputs.key}.lock"):
        found = None if rebuild else locate(opts, inputs)
        if found is not None:
            say(f"cached: {found.root} (built {found.info.get('built')}, torch {found.info.get('torch')})")
            return found
        say(f"building {inputs.key} in {opts.cache / inputs.key}")
        prepared = build(opts, inputs, opts.cache / inputs.key)
    say(f"ready in {time.monotonic() - started:.0f} s")
    return prepared


def main(argv: list[str] | None = None) -> int:
    opts = Options.from_env(os.environ)
    p = argparse.ArgumentParser(prog="real_comfyui.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", type=Path, default=opts.upstream, help=f"default {opts.upstream}")
    p.add_argument("--cache", type=Path, default=opts.cache, help=f"default {opts.cache}")
    p.add_argument("--python", default=opts.python, help="the interpreter the venv is made from (default: this one)")
    p.add_argument("--rebuild", action="store_true", help="build again even when a finished build exists")
    p.add_argument("--locate", action="store_true", help="only print the dir of a finished build; exit 1 if none")
    args = p.parse_args(argv)
    opts = Options(args.upstream.resolve(), args.cache.expanduser().resolve(), args.python, opts.torch_index_url,
                   opts.node_list)
    try:
        if args.locate:
            found = locate(opts)
            if found is None:
                print(NOT_PREPARED, file=sys.stderr)
                return 1
            print(found.root)
            return 0
        prepared = prepare(opts, args.rebuild)
    except BuildError as exc:
        say(f"error: {exc}")
        return 1
    print(prepared.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
