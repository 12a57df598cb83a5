"""The worker's entry point: read the settings, start ComfyUI under supervision, then serve.

ComfyUI is spawned first, before any heavy import, so its ~10 s start overlaps the worker's own start-up
(``import runpod`` alone takes ~2 s).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from .config import ConfigError, Settings, load_settings
from .logs import setup_logging
from .states import State
from .supervisor import ComfySupervisor

log = logging.getLogger("supervisor.main")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"comfyui-worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log_level)
    _default_sigint()
    supervisor = ComfySupervisor(settings)
    supervisor.start()
    return asyncio.run(_serve(settings, supervisor))


def _default_sigint() -> None:
    """A worker started in the background by a shell inherits SIGINT as ignored, and so would ComfyUI."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


async def _serve(settings: Settings, supervisor: ComfySupervisor) -> int:
    """Run until SIGTERM/SIGINT (exit 0 after a clean stop) or until the supervisor fails (exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    finished = asyncio.ensure_future(asyncio.to_thread(supervisor.wait_finished))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({finished, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if supervisor.status().state is State.FAILED:
        stopping.cancel()
        log.error("exiting: %s", supervisor.status().message.splitlines()[0])
        await asyncio.to_thread(supervisor.stop)
        return EXIT_FAILED
    log.info("stop requested: no new jobs; stopping ComfyUI")
    supervisor.begin_shutdown()
    await asyncio.to_thread(supervisor.stop)
    finished.cancel()
    return EXIT_OK
