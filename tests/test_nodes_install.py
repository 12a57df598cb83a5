"""The node installer with real git repositories, a real pip, a separate "ComfyUI interpreter", and the stand-in
ComfyUI (tests/standin) doing the import check exactly as ComfyUI logs it.

ComfyUI's interpreter here is a venv of its own (its site-packages see the worker venv's packages through a .pth
file, for aiohttp and pip), so a requirement installed into the wrong interpreter is visible. Packages come from
a local wheelhouse (PIP_NO_INDEX): no network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.hubserver.harness import run_script

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "standin"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


# ------------------------------------------------------------------------------------------------ builders


def build_wheel(wheelhouse: Path, name: str, version: str, body: str = "") -> Path:
    """A minimal pure-Python wheel (pip installs it without any build backend)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n{body}",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    wheel = wheelhouse / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True, capture_output=True,
                          text=True).stdout.strip()


def make_pack(root: Path, name: str, files: dict[str, str]) -> tuple[str, str]:
    """A git repository holding a node pack; returns (file:// URL, commit)."""
    repo = root / "remotes" / name
    repo.mkdir(parents=True)
    for rel, text in files.items():
        (repo / rel).write_text(textwrap.dedent(text))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pack")
    return f"file://{repo}", git(repo, "rev-parse", "HEAD")


NODE_CLASS = """
class {cls}:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"image": ("IMAGE",)}}}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "test"
    def run(self, image):
        return (image,)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Packs, wheels and ComfyUI's interpreter, built once for this module."""
    root = tmp_path_factory.mktemp("nodes")
    wheelhouse = root / "wheels"
    wheelhouse.mkdir()
    build_wheel(wheelhouse, "tinydep", "1.0", "VALUE = 42\n")
    build_wheel(wheelhouse, "torch", "0.0.1")
    build_wheel(wheelhouse, "torch", "9.9.9")

    venv = root / "comfy-venv"  # ComfyUI's interpreter, not the one running the tests or the installer
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "worker-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheelhouse),
                    "torch==0.0.1"], check=True)

    packs = {
        "goodpack": make_pack(root, "goodpack", {
            "__init__.py": "import tinydep\n" + NODE_CLASS.format(cls="GoodNode")
                           + "NODE_CLASS_MAPPINGS = {'GoodNode': GoodNode}\n",
            "requirements.txt": "# runtime deps\ntinydep==1.0\ntorch\n",
            "install.py": "from pathlib import Path\nPath('installed.marker').write_text('ok')\n",
        }),
        "brokenpack": make_pack(root, "brokenpack", {
            "__init__.py": "import cv2_missing_for_test\nNODE_CLASS_MAPPINGS = {}\n",
        }),
        "emptypack": make_pack(root, "emptypack", {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n"}),
        "torchpack": make_pack(root, "torchpack", {
            "__init__.py": NODE_CLASS.format(cls="TorchNode") + "NODE_CLASS_MAPPINGS = {'TorchNode': TorchNode}\n",
            "requirements.txt": "torch>=2.0\n",
        }),
        "badscript": make_pack(root, "badscript", {
            "__init__.py": NODE_CLASS.format(cls="B") + "NODE_CLASS_MAPPINGS = {'B': B}\n",
            "install.py": "raise SystemExit('cannot build the CUDA kernels')\n",
        }),
    }
    return {"root": root, "wheelhouse": wheelhouse, "python": str(python), "packs": packs}


@pytest.fixture
def comfyui(tmp_path: Path) -> Path:
    """A ComfyUI tree: a copy of the stand-in, with an empty custom_nodes/."""
    tree = tmp_path / "ComfyUI"
    shutil.copytree(STANDIN, tree, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(tree / "custom_nodes")
    (tree / "custom_nodes").mkdir()
    return tree


def install(world: dict, comfyui: Path, lines: list[str], *extra: str, **env: str):
    node_list = comfyui.parent / "custom_nodes.txt"
    node_list.write_text("# test list\n" + "\n".join(lines) + "\n")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "NODES_", "ALLOW_"))}
    full_env.update(GIT_ENV, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(world["wheelhouse"]), **env)
    return run_script("install_nodes.py", ["--comfyui-dir", str(comfyui), "--python", world["python"],
                                           "--list", str(node_list), *extra], full_env, timeout=150)


def pinned(world: dict, name: str, extras: str = "") -> str:
    url, commit = world["packs"][name]
    return f"{url}@{commit} {extras}".strip()


def can_import(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------------------ tests


def test_a_good_pack_is_cloned_at_its_commit_installed_into_comfyuis_interpreter_and_proven(world, comfyui) -> None:
    subprocess.run([world["python"], "-m", "pip", "uninstall", "-q", "-y", "tinydep"], capture_output=True)
    assert not can_import(world["python"], "tinydep")
    result = install(world, comfyui, [pinned(world, "goodpack")])

    assert result.returncode == 0, result.stdout + result.stderr
    pack = comfyui / "custom_nodes" / "goodpack"
    assert git(pack, "rev-parse", "HEAD") == world["packs"]["goodpack"][1]
    assert can_import(world["python"], "tinydep")  # ComfyUI's interpreter got the requirement...
    assert not can_import(sys.executable, "tinydep")  # ...and the worker's did not
    assert (pack / "installed.marker").read_text() == "ok"  # install.py ran, in the pack's directory
    assert "holding torch 0.0.1" in result.stdout
    assert "imports: goodpack (1 node classes)" in result.stdout

    again = install(world, comfyui, [pinned(world, "goodpack")])
    assert again.returncode == 0, again.stdout
    assert f"goodpack: at {world['packs']['goodpack'][1]}" in again.stdout


def test_a_branch_pin_is_refused_unless_unpinned_refs_are_allowed(world, comfyui) -> None:
    url, commit = world["packs"]["emptypack"]
    refused = install(world, comfyui, [f"{url}@main"])

    assert refused.returncode == 2
    assert "custom_nodes.txt: line 2 (emptypack): field 'commit': 'main' is a branch or tag" in refused.stdout
    assert "ALLOW_UNPINNED=true" in refused.stdout
    assert list((comfyui / "custom_nodes").iterdir()) == []

    allowed = install(world, comfyui, [f"{url}@main"], "--check", "none", ALLOW_UNPINNED="true")
    assert allowed.returncode == 0, allowed.stdout
    assert f"unpinned ref 'main' resolved to {commit}" in allowed.stdout


def test_a_broken_pack_fails_the_install_naming_the_pack_and_the_import_error(world, comfyui) -> None:
    result = install(world, comfyui, [pinned(world, "goodpack"), pinned(world, "brokenpack")])

    assert result.returncode == 1
    out = result.stdout
    assert "1 node pack(s) failed the import check" in out
    assert ("line 3 (brokenpack): IMPORT FAILED: ModuleNotFoundError: No module named 'cv2_missing_for_test'"
            in out)
    assert "(goodpack)" not in out.split("failed the import check")[1]


def test_quick_mode_reads_comfyuis_import_block(world, comfyui) -> None:
    result = install(world, comfyui, [pinned(world, "goodpack"), pinned(world, "brokenpack")], "--check", "quick")

    assert result.returncode == 1
    assert "--quick-test-for-ci" in result.stdout
    assert "(brokenpack): IMPORT FAILED: ModuleNotFoundError" in result.stdout


def test_a_pack_that_registers_no_class_fails(world, comfyui) -> None:
    result = install(world, comfyui, [pinned(world, "emptypack")])

    assert result.returncode == 1
    assert "line 2 (emptypack): imported but registered no node class" in result.stdout


def test_torch_is_held_at_its_installed_version(world, comfyui) -> None:
    result = install(world, comfyui, [pinned(world, "torchpack")])

    assert result.returncode == 1
    # one line naming the pack, what is held and the requirement that would replace it
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("  - line 2 (torchpack)"))
    assert "would replace torch==0.0.1, which the build holds: torch>=2.0" in line, line
    version = subprocess.run([world["python"], "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    assert version == "0.0.1"


def test_a_failing_install_script_names_the_pack(world, comfyui) -> None:
    result = install(world, comfyui, [pinned(world, "badscript")])

    assert result.returncode == 1
    assert "line 2 (badscript): install.py failed (exit 1): cannot build the CUDA kernels" in result.stdout


def test_extras_are_installed_and_checked(world, comfyui) -> None:
    result = install(world, comfyui, [pinned(world, "emptypack", "tinydep==1.0")], "--check", "none")

    assert result.returncode == 0, result.stdout
    assert "emptypack: pip install tinydep==1.0" in result.stdout


def test_the_interpreter_must_be_named(world, comfyui) -> None:
    node_list = comfyui.parent / "custom_nodes.txt"
    node_list.write_text(pinned(world, "goodpack") + "\n")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PYTHON"}

    result = run_script("install_nodes.py", ["--comfyui-dir", str(comfyui), "--list", str(node_list)], env)

    assert result.returncode == 2
    assert "--python PATH or COMFYUI_PYTHON" in result.stdout


def test_the_record_lists_each_installed_pack_with_its_commit(world, comfyui, tmp_path: Path) -> None:
    record = tmp_path / "build" / "nodes-record.json"
    url, commit = world["packs"]["goodpack"]

    result = install(world, comfyui, [pinned(world, "goodpack")], "--record", str(record))

    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(record.read_text()) == {"custom_nodes": [{"name": "goodpack", "url": url, "commit": commit}]}


def test_a_failed_install_writes_no_record(world, comfyui, tmp_path: Path) -> None:
    record = tmp_path / "nodes-record.json"
    result = install(world, comfyui, [pinned(world, "goodpack"), pinned(world, "brokenpack")], "--record", str(record))
    assert result.returncode == 1, result.stdout
    assert not record.exists()


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:ghp_secret@github.com/a/b.git", "https://github.com/a/b.git"),
    ("https://ghp_secret@github.com/a/b", "https://github.com/a/b"),
    ("https://github.com/a/b", "https://github.com/a/b"),
    ("file:///srv/git/pack", "file:///srv/git/pack"),
])
def test_a_recorded_url_carries_no_credentials(url: str, shown: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from buildlib.common import without_credentials

    assert without_credentials(url) == shown
