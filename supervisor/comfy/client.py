"""ComfyUI's HTTP and websocket API, as the job engine uses it (facts: comfyui-protocol.md sections 2-5).

One :class:`ComfyClient` per worker, over one aiohttp session. It knows the wire format and nothing about
jobs: the engine (:mod:`supervisor.jobs.engine`) decides when to call what. Every network failure becomes a
:class:`~supervisor.errors.ComfyUnavailableError` saying which server could not be reached, in the words the
official worker documents ("ComfyUI server (127.0.0.1:8188) not reachable ...").

Routes that only acknowledge (``POST /queue``, ``/interrupt``) answer 200 with an empty body: never parsed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from supervisor.errors import ComfyUnavailableError

log = logging.getLogger("supervisor.comfy_client")

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=5)  # uploads, /object_info, /prompt
CONTROL_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=5)  # small calls: a hung ComfyUI must not stall us
WS_HEARTBEAT_S = 20.0
WS_MAX_MSG = 64 * 1024 * 1024


class PromptRejected(Exception):
    """``POST /prompt`` answered 400: the body holds ``error`` and ``node_errors``."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        super().__init__(f"ComfyUI refused the prompt ({status})")


class ComfyClient:
    """Thin async wrapper of the routes the worker needs."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.host_port = parts.netloc or self.base_url

    def unreachable(self, why: str) -> ComfyUnavailableError:
        return ComfyUnavailableError(f"ComfyUI server ({self.host_port}) not reachable: {why}", details={"reason": why})

    async def _request(
        self, method: str, path: str, *, expect_json: bool = True, timeout: aiohttp.ClientTimeout = CONTROL_TIMEOUT,
        **kwargs: Any,
    ) -> tuple[int, Any]:
        url = self.base_url + path
        try:
            async with self.session.request(method, url, timeout=timeout, **kwargs) as resp:
                text = await resp.text()
                if resp.status >= 500:
                    raise self.unreachable(f"{method} {path} answered {resp.status}: {text.strip()[:200]}")
                if not expect_json or not text:
                    return resp.status, None
                try:
                    return resp.status, json.loads(text)
                except ValueError:
                    raise self.unreachable(f"{method} {path} answered {resp.status} with non-JSON text") from None
        except aiohttp.ClientError as exc:
            raise self.unreachable(f"{method} {path} failed: {_why(exc)}") from None
        except TimeoutError:
            raise self.unreachable(f"{method} {path} got no answer within {timeout.total:g} s") from None

    async def object_info(self) -> dict[str, Any]:
        status, body = await self._request("GET", "/object_info", timeout=REQUEST_TIMEOUT)
        if status != 200 or not isinstance(body, dict):
            raise self.unreachable(f"GET /object_info answered {status}")
        return body

    async def upload_image(self, data: bytes, filename: str, subfolder: str) -> str:
        """Upload into ``input/<subfolder>``; the value a ``LoadImage`` input must hold to load it."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename, content_type="application/octet-stream")
        form.add_field("subfolder", subfolder)
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        status, body = await self._request("POST", "/upload/image", data=form, timeout=REQUEST_TIMEOUT)
        if status != 200 or not isinstance(body, Mapping) or not body.get("name"):
            raise ComfyUploadError(f"ComfyUI answered {status} to the upload of {filename!r}")
        sub = str(body.get("subfolder") or "")
        return f"{sub}/{body['name']}" if sub else str(body["name"])

    async def queue_prompt(self, prompt: Mapping[str, Any], client_id: str, prompt_id: str) -> dict[str, Any]:
        """Queue the graph; the 200 body (``prompt_id``, ``number``, ``node_errors``) or PromptRejected."""
        payload = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
        status, body = await self._request("POST", "/prompt", json=payload, timeout=REQUEST_TIMEOUT)
        if status != 200:
            raise PromptRejected(status, body)
        return body if isinstance(body, dict) else {}

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The finished prompt's history entry, or None while it is queued, running or unknown."""
        _status, body = await self._request("GET", f"/history/{prompt_id}")
        if isinstance(body, Mapping) and isinstance(body.get(prompt_id), dict):
            return body[prompt_id]
        return None

    async def system_stats(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """``/system_stats``: ``system`` (``comfyui_version``, ``python_version``...) and ``devices``."""
        status, body = await self._request("GET", "/system_stats", timeout=aiohttp.ClientTimeout(total=timeout_s))
        if status != 200 or not isinstance(body, dict):
            raise self.unreachable(f"GET /system_stats answered {status}")
        return body

    async def queue(self) -> dict[str, list[Any]]:
        _status, body = await self._request("GET", "/queue")
        return body if isinstance(body, dict) else {}

    async def prompt_state(self, prompt_id: str) -> str:
        """``running``, ``pending`` or ``absent`` according to ``GET /queue``."""
        body = await self.queue()
        for state, key in (("running", "queue_running"), ("pending", "queue_pending")):
            if any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in body.get(key) or []):
                return state
        return "absent"

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt ``prompt_id`` if it is the one running (a no-op otherwise)."""
        await self._request("POST", "/interrupt", json={"prompt_id": prompt_id}, expect_json=False)

    async def delete_queued(self, prompt_ids: Sequence[str]) -> None:
        """Remove pending prompts (unknown or running ids are ignored by ComfyUI)."""
        await self._request("POST", "/queue", json={"delete": list(prompt_ids)}, expect_json=False)

    async def connect_ws(self, client_id: str) -> aiohttp.ClientWebSocketResponse:
        """Open ``/ws?clientId=...``; events of prompts queued with this client id come here."""
        url = self.base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT.total):
                return await self.session.ws_connect(
                    url,
                    params={"clientId": client_id},
                    heartbeat=WS_HEARTBEAT_S,
                    max_msg_size=WS_MAX_MSG,
                    # a healthy ComfyUI answers the close frame at once; a hung one must not hold the job
                    timeout=aiohttp.ClientWSTimeout(ws_close=1),
                )
        except aiohttp.ClientError as exc:
            raise self.unreachable(f"the websocket could not be opened: {_why(exc)}") from None
        except TimeoutError:
            raise self.unreachable("the websocket could not be opened in time") from None


class ComfyUploadError(Exception):
    """ComfyUI refused an input upload (it answered, so it is not unreachable)."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
