"""Which node classes the worker needs before it calls itself ready.

They are the classes used by the named workflows baked into ``WORKFLOWS_DIR`` (each file either an
API-format graph, ``{"workflow": graph, ...}`` or ComfyUI Deploy's ``{"workflow_api": graph, ...}``; see
:mod:`supervisor.api.workflows`) plus the ``REQUIRED_NODES`` list. A class missing from
ComfyUI means a node pack failed to import: the supervisor reports it as ``degraded`` at start-up instead
of letting the first job discover it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("supervisor")


def graph_of(document: Any) -> dict[str, Any] | None:
    """The API-format graph inside a workflow file, or None if the document holds none."""
    if isinstance(document, dict) and isinstance(document.get("workflow"), dict):
        document = document["workflow"]
    elif isinstance(document, dict) and isinstance(document.get("workflow_api"), dict):
        document = document["workflow_api"]
    if isinstance(document, dict) and document and all(
        isinstance(node, dict) and isinstance(node.get("class_type"), str) for node in document.values()
    ):
        return document
    return None


def classes_in(graph: dict[str, Any]) -> set[str]:
    return {node["class_type"] for node in graph.values()}


def required_classes(workflows_dir: Path, extra: Iterable[str]) -> tuple[str, ...]:
    """Sorted, de-duplicated class names. Unreadable workflow files are logged and skipped."""
    needed = {name for name in extra if name}
    if workflows_dir.is_dir():
        for path in sorted(workflows_dir.glob("*.json")):
            try:
                graph = graph_of(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                log.warning("skipping workflow %s: %s", path, exc)
                continue
            if graph is None:
                log.warning("skipping workflow %s: it holds no API-format graph", path)
                continue
            needed |= classes_in(graph)
    return tuple(sorted(needed))
