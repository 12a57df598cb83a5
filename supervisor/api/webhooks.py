"""Webhooks: a finished job's body POSTed to the URL its request named, through the SSRF guard, with retries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from supervisor.jobs.netguard import FetchError, GuardedFetcher, URLRefused, redact_url

log = logging.getLogger("supervisor.api")

WEBHOOK_ATTEMPTS = 3
WEBHOOK_DELAY_S = 2.0
WEBHOOK_TIMEOUT_S = 10.0


class WebhookSender:
    """Delivers job bodies; the guarded client is made on first use, so a worker without webhooks has none."""

    def __init__(self, allowlist: Sequence[str]) -> None:
        self.allowlist = allowlist
        self._fetcher: GuardedFetcher | None = None

    async def send(self, job_id: str, url: str, body: dict[str, Any]) -> None:
        """Up to WEBHOOK_ATTEMPTS tries; a URL the guard refuses is not retried. Never raises."""
        if self._fetcher is None:
            self._fetcher = GuardedFetcher(self.allowlist, timeout_s=WEBHOOK_TIMEOUT_S,
                                           user_agent="comfyui-worker-webhook")
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                await self._fetcher.fetch(url, method="POST", json=body, max_bytes=64 * 1024)
                log.info("job %s: webhook delivered to %s", job_id, redact_url(url))
                return
            except URLRefused as exc:
                log.warning("job %s: webhook not sent: %s", job_id, exc)
                return
            except FetchError as exc:
                log.warning("job %s: webhook attempt %d/%d failed: %s", job_id, attempt, WEBHOOK_ATTEMPTS, exc)
            if attempt < WEBHOOK_ATTEMPTS:
                await asyncio.sleep(WEBHOOK_DELAY_S * attempt)

    async def close(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.close()
            self._fetcher = None
