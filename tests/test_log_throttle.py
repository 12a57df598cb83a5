"""LogThrottle: a condition that happens thousands of times gives one line at once and one count per interval."""

from __future__ import annotations

import asyncio
import logging

import pytest

from supervisor.api.log_throttle import LogThrottle

INTERVAL_S = 0.3


async def test_a_flood_is_one_line_then_one_count_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.throttle")
    throttle = LogThrottle(log, INTERVAL_S)
    with caplog.at_level(logging.INFO, logger="test.throttle"):
        for n in range(5000):
            throttle.event("flood", logging.WARNING, "refused %d", n)
        throttle.event("other", logging.INFO, "another condition")
        assert [r.getMessage() for r in caplog.records] == ["refused 0", "another condition"]
        await asyncio.sleep(INTERVAL_S * 1.5)
        assert [r.getMessage() for r in caplog.records][2:] == [f"refused 4999 (4999 more in the last {INTERVAL_S:g} s)"]
        # the flood goes on: still at most one line per interval
        for n in range(100):
            throttle.event("flood", logging.WARNING, "refused %d", n)
        await asyncio.sleep(INTERVAL_S * 1.5)
        flood = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
        assert flood == ["refused 0", f"refused 4999 (4999 more in the last {INTERVAL_S:g} s)",
                         f"refused 99 (100 more in the last {INTERVAL_S:g} s)"]
        assert [r.levelno for r in caplog.records if r.getMessage().startswith("refused")] == [logging.WARNING] * 3
        # quiet for an interval: the next one is logged at once again
        await asyncio.sleep(INTERVAL_S * 1.2)
        throttle.event("flood", logging.WARNING, "refused %d", 7)
        assert caplog.records[-1].getMessage() == "refused 7"


async def test_close_reports_what_is_pending(caplog: pytest.LogCaptureFixture) -> None:
    throttle = LogThrottle(logging.getLogger("test.throttle"), 60.0)
    with caplog.at_level(logging.INFO, logger="test.throttle"):
        for _ in range(3):
            throttle.event("x", logging.INFO, "thing")
        throttle.close()
    assert [r.getMessage() for r in caplog.records] == ["thing", "thing (2 more in the last 60 s)"]
