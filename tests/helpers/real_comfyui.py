"""The real ComfyUI for tests: where ``make real-comfyui`` put it, and the tiny real models it runs.

    real = find_real_comfyui()            # None until `make real-comfyui` has run on this machine
    models = tiny_models_dir(real)        # <cache>/tiny-models/<key>/{checkpoints,clip_vision,ipadapter}/..., made once
    env = worker_env(tmp_path, COMFYUI_DIR=str(real.comfyui_dir), COMFYUI_PYTHON=str(real.python),
                     MODELS_DIR=str(models))

The builder is ``scripts/real_comfyui.py`` (its cache key hashes the upstream inputs); the models are made by
``tests/helpers/tiny_models.py`` with the real ComfyUI's interpreter (it has torch; the worker's venv does not)
and cached beside the builds, keyed by the generator's source, the seed and the build they were made with.
API-format workflows that use them are in ``tests/fixtures/real/``.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.helpers import tiny_models

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "scripts" / "real_comfyui.py"
WORKFLOWS_DIR = ROOT / "tests" / "fixtures" / "real"


@functools.cache
def builder() -> ModuleType:
    """``scripts/real_comfyui.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("real_comfyui_builder", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class RealComfyUI:
    """A prepared real ComfyUI: its source tree, the venv interpreter that runs it, its build's key."""

    comfyui_dir: Path
    python: Path
    key: str
    cache: Path


def not_prepared_message() -> str:
    return builder().NOT_PREPARED


def find_real_comfyui() -> RealComfyUI | None:
    """The finished build for the current inputs (``REAL_COMFYUI_UPSTREAM``, ``REAL_COMFYUI_CACHE``), or None."""
    b = builder()
    opts = b.Options.from_env(os.environ)
    try:
        found = b.locate(opts)
    except b.BuildError:
        return None
    if found is None:
        return None
    return RealComfyUI(found.comfyui_dir, found.python, found.info["key"], opts.cache)


def tiny_models_dir(real: RealComfyUI, seed: int = tiny_models.DEFAULT_SEED) -> Path:
    """The tiny models for this build, generated once per machine into the cache (under a lock)."""
    source = Path(tiny_models.__file__).read_bytes()
    key = hashlib.sha256(source + f"|{seed}|{real.key}".encode()).hexdigest()[:16]
    dest = real.cache / "tiny-models" / key
    if (dest / tiny_models.MANIFEST).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (dest.parent / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / tiny_models.MANIFEST).is_file():
            subprocess.run([str(real.python), tiny_models.__file__, str(dest), "--seed", str(seed)], check=True,
                           capture_output=True, text=True)
    return dest


def models_manifest(models_dir: Path) -> dict[str, Any]:
    """``models.json`` of a tiny models dir: ``{"seed", "torch", "files": {relative path: {size, sha256}}}``."""
    return json.loads((models_dir / tiny_models.MANIFEST).read_text())


def workflow(name: str = "sdxl_plain", seed: int | None = None, steps: int | None = None,
             prefix: str | None = None) -> dict[str, Any]:
    """An API-format workflow from tests/fixtures/real (``sdxl_plain``, ``sdxl_ipadapter_advanced``, ...), with
    the KSampler's (node 5) seed and steps and the SaveImage's (node 7) prefix changed when given."""
    graph = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    graph["5"]["inputs"].update({k: v for k, v in (("seed", seed), ("steps", steps)) if v is not None})
    if prefix is not None:
        graph["7"]["inputs"]["filename_prefix"] = prefix
    return graph
