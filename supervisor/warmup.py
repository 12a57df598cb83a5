"""The optional warm-up: one workflow run after every (re)start, before the worker reports ready.

It loads the models into memory so the first real job does not pay for it (users measured ~45 s cold vs
~15 s warm). It talks to ComfyUI directly, because while it runs the supervisor is not ready and the job
engine would (rightly) wait for readiness.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from .workflow_classes import graph_of


class WarmupError(Exception):
    """The warm-up workflow could not be read or did not run to success."""


async def run_warmup(http: aiohttp.ClientSession, base_url: str, path: Path, timeout: float) -> None:
    """Run the workflow at ``path`` to its end; raise WarmupError with one line saying why it failed."""
    graph = await asyncio.to_thread(_load, path)
    client_id = uuid.uuid4().hex
    try:
        async with asyncio.timeout(timeout):
            async with http.ws_connect(f"{base_url}/ws?clientId={client_id}") as ws:
                prompt_id = await _submit(http, base_url, graph, client_id)
                await _until_done(ws, prompt_id)
    except TimeoutError:
        raise WarmupError(f"warm-up workflow {path.name} did not finish within {timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise WarmupError(f"warm-up workflow {path.name}: ComfyUI connection failed: {exc}") from None


def _load(path: Path) -> dict[str, Any]:
    try:
        graph = graph_of(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise WarmupError(f"cannot read WARMUP_WORKFLOW={path}: {exc}") from None
    if graph is None:
        raise WarmupError(f"WARMUP_WORKFLOW={path} holds no API-format graph (export it with 'Export (API)')")
    return graph


async def _submit(http: aiohttp.ClientSession, base_url: str, graph: dict[str, Any], client_id: str) -> str:
    async with http.post(f"{base_url}/prompt", json={"prompt": graph, "client_id": client_id}) as resp:
        body = await resp.json(content_type=None)
    if resp.status != 200:
        errors = body.get("node_errors") if isinstance(body, dict) else None
        raise WarmupError(f"ComfyUI refused the warm-up workflow ({resp.status}): {json.dumps(errors or body)[:500]}")
    return str(body["prompt_id"])


async def _until_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str) -> None:
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        event = json.loads(msg.data)
        data = event.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        if event.get("type") == "execution_error":
            raise WarmupError(
                f"warm-up failed at node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type')}: {str(data.get('exception_message', '')).strip()}"
            )
        if event.get("type") == "executing" and data.get("node") is None:
            return
    raise WarmupError("ComfyUI closed the websocket during the warm-up")
