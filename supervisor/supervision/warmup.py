"""The optional warm-up: one workflow run after every (re)start, before the worker reports ready.

It loads the models into memory so the first real job does not pay for it (users measured ~45 s cold vs
~15 s warm). It talks to ComfyUI directly, because while it runs the supervisor is not ready and the job
engine would (rightly) wait for readiness; it uses the job engine's ComfyUI client, not the engine.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from supervisor.comfy.client import ComfyClient, PromptRejected
from supervisor.errors import ComfyUnavailableError
from supervisor.comfy.node_classes import graph_of


class WarmupError(Exception):
    """The warm-up workflow could not be read or did not run to success."""


async def run_warmup(http: aiohttp.ClientSession, base_url: str, path: Path, timeout: float) -> None:
    """Run the workflow at ``path`` to its end; raise WarmupError with one line saying why it failed."""
    graph = await asyncio.to_thread(_load, path)
    client = ComfyClient(http, base_url)
    client_id, prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
    try:
        async with asyncio.timeout(timeout):
            ws = await client.connect_ws(client_id)
            try:
                await client.queue_prompt(graph, client_id, prompt_id)
                await _until_done(ws, prompt_id)
            finally:
                await ws.close()
    except TimeoutError:
        raise WarmupError(f"warm-up workflow {path.name} did not finish within {timeout:g} s") from None
    except PromptRejected as exc:
        errors = exc.body.get("node_errors") if isinstance(exc.body, dict) else None
        raise WarmupError(
            f"ComfyUI refused the warm-up workflow ({exc.status}): {json.dumps(errors or exc.body)[:500]}"
        ) from None
    except (ComfyUnavailableError, aiohttp.ClientError) as exc:
        raise WarmupError(f"warm-up workflow {path.name}: {exc}") from None


def _load(path: Path) -> dict[str, Any]:
    try:
        graph = graph_of(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise WarmupError(f"cannot read WARMUP_WORKFLOW={path}: {exc}") from None
    if graph is None:
        raise WarmupError(f"WARMUP_WORKFLOW={path} holds no API-format graph (export it with 'Export (API)')")
    return graph


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
