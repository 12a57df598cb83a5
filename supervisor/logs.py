"""Logging for people: one line per event, ComfyUI's own lines prefixed with ``[comfyui]``."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Configure the root logger once (before ``import runpod``, whose basicConfig then does nothing)."""
    root = logging.getLogger()
    if getattr(root, "_comfy_worker_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    root._comfy_worker_configured = True  # type: ignore[attr-defined]
