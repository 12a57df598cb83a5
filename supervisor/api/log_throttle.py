"""One log line per condition per interval, however often the condition happens.

A hostile or broken client can make the same thing happen thousands of times a second (malformed requests,
connections over the limit, the process out of file descriptors); a line per event would fill the disk and bury
everything else. The first event of a condition is logged at once; later ones within the interval are counted
and reported in one line when the interval ends ("... (412 more in the last 60 s)").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LOG_INTERVAL_S = 60.0


@dataclass
class _Condition:
    logged_at: float
    level: int = logging.INFO
    message: str = ""
    args: tuple[Any, ...] = ()
    suppressed: int = 0
    flush: asyncio.TimerHandle | None = None


class LogThrottle:
    """Logs each condition (a short key such as ``"header-timeout"``) at most once per ``interval_s``."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._conditions: dict[str, _Condition] = {}

    def event(self, condition: str, level: int, message: str, *args: Any) -> None:
        """One occurrence: logged now if the condition was quiet for an interval, else counted."""
        now = self.clock()
        state = self._conditions.get(condition)
        if state is None or now - state.logged_at >= self.interval_s:
            earlier = 0
            if state is not None:
                earlier = state.suppressed  # only when no loop could flush them in time
                if state.flush is not None:
                    state.flush.cancel()
            self._conditions[condition] = _Condition(logged_at=now)
            if earlier:
                self.logger.log(level, message + " (%d more before it)", *args, earlier)
            else:
                self.logger.log(level, message, *args)
            return
        state.level, state.message, state.args = level, message, args
        state.suppressed += 1
        if state.flush is None:
            state.flush = self._schedule(state.logged_at + self.interval_s - now, condition)

    def _schedule(self, delay: float, condition: str) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a loop: the count goes into the next line of this condition instead
            return None
        return loop.call_later(max(delay, 0.0), self.flush, condition)

    def flush(self, condition: str) -> None:
        """Report what was counted since the last line of ``condition`` (called when its interval ends)."""
        state = self._conditions.get(condition)
        if state is None or not state.suppressed:
            return
        self.logger.log(state.level, state.message + " (%d more in the last %g s)", *state.args, state.suppressed,
                        self.interval_s)
        self._conditions[condition] = _Condition(logged_at=self.clock())

    def close(self) -> None:
        """Report every pending count now (at shutdown)."""
        for condition, state in list(self._conditions.items()):
            if state.flush is not None:
                state.flush.cancel()
            self.flush(condition)
