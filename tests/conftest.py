"""Shared pytest fixtures. ``standin``: a stand-in ComfyUI process for one test, stopped at teardown;
``standin_factory``: start several / with options (env, models, custom nodes, extra args)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from tests.helpers.checkout import cache_home, checkout_entries
from tests.helpers.standin import StandIn, start_standin

# Hypothesis keeps its example database and constants in ./.hypothesis by default: in the checkout.
set_hypothesis_home_dir(cache_home() / "hypothesis")
CHECKOUT_BEFORE = pytest.StashKey[set[str] | None]()
CHECKOUT_WRITTEN = pytest.StashKey[list[str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[CHECKOUT_BEFORE] = checkout_entries()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests never write into the checkout: a path that appeared in it during the run fails the run."""
    before = session.config.stash.get(CHECKOUT_BEFORE, None)
    after = checkout_entries() if before is not None else None
    written = sorted((after or set()) - (before or set()))
    session.config.stash[CHECKOUT_WRITTEN] = written
    if written and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    written = terminalreporter.config.stash.get(CHECKOUT_WRITTEN, [])
    if written:
        terminalreporter.write_sep("=", "the run wrote into the checkout (tests must write under tmp_path)", red=True)
        for line in written:
            terminalreporter.write_line(f"  {line}")


@pytest.fixture
def standin_factory(tmp_path: Path) -> Iterator[Callable[..., StandIn]]:
    """``standin_factory(env=..., models=..., extra_args=..., custom_node_dirs=..., wait=...)``."""
    started: list[StandIn] = []

    def factory(**kwargs) -> StandIn:
        sd = start_standin(tmp_path, **kwargs)
        started.append(sd)
        return sd

    yield factory
    for sd in started:
        sd.stop()


@pytest.fixture
def standin(standin_factory: Callable[..., StandIn]) -> StandIn:
    """A default stand-in ComfyUI (no models) serving on a free port."""
    return standin_factory()
