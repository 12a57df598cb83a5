"""The graph as queued for one job: inputs pointed at the job's uploads, outputs written into the job's folder.

The request's workflow names images by what the user called them and saves under the user's prefixes; ComfyUI
must see the files as uploaded into ``input/<job folder>/`` and write under ``output/<job folder>/``, so that
outputs are isolated, cleanup is one folder, and ComfyUI's cache cannot replay a file of an earlier job. Pure
functions: the request's graph is never changed in place.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from supervisor.jobs.inputs import ResolvedInputs

INPUT_SUFFIX = " [input]"  # ComfyUI's annotated form of a file name in the input folder


def rewrite_inputs(graph: Mapping[str, Any], resolved: ResolvedInputs, uploaded: Mapping[str, str]) -> dict[str, Any]:
    """Inline images become their uploaded file; every string input equal to a supplied name, its upload."""
    out: dict[str, Any] = {}
    for node_id, node in graph.items():
        inputs = dict(node["inputs"])
        for name, value in inputs.items():
            if not isinstance(value, str):
                continue
            if (node_id, name) in resolved.inline:
                inputs[name] = uploaded[resolved.inline[(node_id, name)]]
            elif value in uploaded:
                inputs[name] = uploaded[value]
            elif value.endswith(INPUT_SUFFIX) and value[: -len(INPUT_SUFFIX)] in uploaded:
                inputs[name] = uploaded[value[: -len(INPUT_SUFFIX)]]
        out[node_id] = {**node, "inputs": inputs}
    return out


def rewrite_prefixes(graph: Mapping[str, Any], folder: str) -> tuple[dict[str, Any], list[str]]:
    """Put every ``filename_prefix`` under the job folder; the ids of nodes whose prefix is a link."""
    out: dict[str, Any] = {}
    linked: list[str] = []
    for node_id, node in graph.items():
        inputs = node["inputs"]
        value = inputs.get("filename_prefix")
        if isinstance(value, str):
            parts = [p for p in re.split(r"[\\/]+", value) if p not in ("", ".", "..")]
            inputs = {**inputs, "filename_prefix": "/".join([folder, *(parts or ["ComfyUI"])])}
        elif isinstance(value, list):
            linked.append(node_id)
        out[node_id] = {**node, "inputs": inputs}
    return out, linked
