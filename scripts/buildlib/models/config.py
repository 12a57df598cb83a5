"""The model fetcher's settings: every one read from the environment in one place (command-line flags override
them), and the constants its messages and modes share. Standard library only, so ``check`` needs no download stack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..common import DEFAULT_SECRETS_DIR, EnvReader

PROG = "fetch_models"
PROGRESS_MODES = ("auto", "bars", "lines", "none")
HASH_MODES = ("inline", "thread")
DEFAULT_MANIFEST = Path(__file__).resolve().parents[3] / "models.yaml"  # beside scripts/


@dataclass(frozen=True)
class FetchConfig:
    """Every setting of the fetcher, read from the environment in one place; command-line flags override it."""

    manifest: Path = DEFAULT_MANIFEST
    models_dir: Path = Path("/opt/ComfyUI/models")
    cache_dir: Path | None = None
    hf_endpoint: str = "https://huggingface.co"
    civitai_endpoint: str = "https://civitai.com"
    secrets_dir: Path = DEFAULT_SECRETS_DIR
    jobs: int = 4
    retries: int = 5
    retry_wait_s: float = 2.0
    timeout_s: float = 60.0
    progress: str = "auto"
    progress_interval_s: float = 10.0
    hash_mode: str = "inline"

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str]) -> FetchConfig:
        r = EnvReader(env)
        comfyui_dir = r.path("COMFYUI_DIR", Path("/opt/ComfyUI")) or Path("/opt/ComfyUI")
        progress = r.string("FETCH_PROGRESS", "auto").lower()
        if progress not in PROGRESS_MODES:
            r.problems.append(f"FETCH_PROGRESS={progress!r} is not valid; accepted: {', '.join(PROGRESS_MODES)}")
            progress = "auto"
        hash_mode = r.string("FETCH_HASH_MODE", "inline").lower()
        if hash_mode not in HASH_MODES:
            r.problems.append(f"FETCH_HASH_MODE={hash_mode!r} is not valid; accepted: {', '.join(HASH_MODES)}")
            hash_mode = "inline"
        cfg = cls(
            manifest=r.path("MODELS_MANIFEST", DEFAULT_MANIFEST) or DEFAULT_MANIFEST,
            models_dir=r.path("MODELS_DIR", comfyui_dir / "models") or comfyui_dir / "models",
            cache_dir=r.path("MODEL_CACHE_DIR", None),
            hf_endpoint=r.string("HF_ENDPOINT", "https://huggingface.co").rstrip("/"),
            civitai_endpoint=r.string("CIVITAI_ENDPOINT", "https://civitai.com").rstrip("/"),
            secrets_dir=r.path("SECRETS_DIR", DEFAULT_SECRETS_DIR) or DEFAULT_SECRETS_DIR,
            jobs=r.integer("FETCH_JOBS", 4, 1, 32),
            retries=r.integer("FETCH_RETRIES", 5, 0, 100),
            retry_wait_s=r.number("FETCH_RETRY_WAIT_S", 2.0, 0, 600),
            timeout_s=r.number("FETCH_TIMEOUT_S", 60.0, 1, 3600),
            progress=progress,
            progress_interval_s=r.number("FETCH_PROGRESS_INTERVAL_S", 10.0, 0.1, 3600),
            hash_mode=hash_mode,
        )
        r.finish()
        return cfg
