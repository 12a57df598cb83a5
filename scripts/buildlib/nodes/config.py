"""The node installer's settings, read from the environment in one place (flags override them), its error and
its output line. Standard library only: the installer runs with ComfyUI's interpreter."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..common import EnvReader

PROG = "install_nodes"
DEFAULT_LIST = Path(__file__).resolve().parents[3] / "custom_nodes.txt"  # beside scripts/
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
