"""The two ComfyUIs a test can run against: the stand-in (tests/standin, every ``make test``) and the real
ComfyUI 0.3.64 on the CPU (``make test-real``, prepared by ``make real-comfyui``).

Tests take the ``comfy`` fixture (tests/conftest.py), parametrised over both; the real one's parameter carries
the ``real`` marker, which ``make test`` deselects. The worker gets the target only through the variables a user
would set (``COMFYUI_DIR``, ``COMFYUI_PYTHON``): it never knows which one it talks to.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import tiny_models
from tests.helpers.standin import STANDIN_DIR, StandIn, start_standin, write_model_file

# The model files the tiny workflows (tests/fixtures/real) name, as ``(folder key, file name)``.
TINY_MODEL_FILES = tuple(tuple(rel.split("/", 1)) for rel in tiny_models.FILES)


@dataclass(frozen=True)
class ComfyTarget:
    """One ComfyUI: its source tree, its interpreter, and the tiny real models (None for the stand-in, whose
    model nodes read no weights)."""

    name: str
    comfyui_dir: Path
    python: str
    tiny_models: Path | None = None

    @property
    def is_real(self) -> bool:
        return self.tiny_models is not None

    @property
    def env(self) -> dict[str, str]:
        """What the worker is told: the variables a user sets to point it at their ComfyUI (and, for the real
        one, a start timeout that leaves room for a busy machine)."""
        env = {"COMFYUI_DIR": str(self.comfyui_dir), "COMFYUI_PYTHON": self.python}
        if self.is_real:
            env["COMFYUI_START_TIMEOUT_S"] = str(int(self.start_timeout_s))
        return env

    @property
    def start_timeout_s(self) -> float:
        """A generous bound on one start (the real one boots in ~5-8 s on 2 idle cores, more when they are busy)."""
        return 90.0 if self.is_real else 15.0

    def add_models(self, models_dir: Path) -> Path:
        """Put the tiny workflows' model files into ``models_dir/<key>/``: links to the real files, or the
        stand-in's small dummy files under the same names. Returns ``models_dir``."""
        for key, name in TINY_MODEL_FILES:
            dest = Path(models_dir) / key / name
            if dest.exists() or dest.is_symlink():
                continue
            if self.tiny_models is None:
                write_model_file(dest)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(self.tiny_models / key / name, dest)
        return Path(models_dir)


STANDIN_TARGET = ComfyTarget("standin", STANDIN_DIR, sys.executable)


def real_target() -> ComfyTarget | None:
    """The real ComfyUI, when ``make real-comfyui`` has prepared it on this machine (models made on first use)."""
    from tests.helpers.real_comfyui import find_real_comfyui, tiny_models_dir

    real = find_real_comfyui()
    if real is None:
        return None
    return ComfyTarget("real", real.comfyui_dir, str(real.python), tiny_models_dir(real))


def start_comfyui(target: ComfyTarget, tmp_path: Path, **kwargs) -> StandIn:
    """Start ``target``'s ComfyUI directly (no worker), with the flags and folders ``start_standin`` gives the
    stand-in; the same ``StandIn`` handle (url, folders, log, stop) comes back for either."""
    kwargs.setdefault("timeout", target.start_timeout_s)
    return start_standin(tmp_path, main=target.comfyui_dir / "main.py", python=target.python, **kwargs)
