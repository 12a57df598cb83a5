"""Shared pytest fixtures. ``standin``: a stand-in ComfyUI process for one test, stopped at teardown;
``standin_factory``: start several / with options (env, models, custom nodes, extra args); ``comfy``: the
ComfyUI a test runs against, parametrised over the stand-in and the real one (marker ``real``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from supervisor.supervision.process import restore_default_sigint
from tests.helpers.checkout import cache_home, checkout_entries
from tests.helpers.comfy_targets import STANDIN_TARGET, ComfyTarget, real_target, start_comfyui
from tests.helpers.standin import StandIn, start_standin

# Hypothesis keeps its example database and constants in ./.hypothesis by default: in the checkout.
set_hypothesis_home_dir(cache_home() / "hypothesis")
CHECKOUT_BEFORE = pytest.StashKey[set[str] | None]()
CHECKOUT_WRITTEN = pytest.StashKey[list[str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[CHECKOUT_BEFORE] = checkout_entries()
    # A suite started in the background of a non-interactive shell (``make test &``, nohup) inherits SIGINT
    # ignored, and so would every stand-in and worker a test starts: they would ignore the SIGINT that stops them.
    restore_default_sigint()


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


def stopped_at_teardown(start: Callable[..., StandIn]) -> Iterator[Callable[..., StandIn]]:
    """A factory fixture's body: yields ``start`` and stops every ComfyUI it started once the test is done."""
    started: list[StandIn] = []

    def factory(**kwargs) -> StandIn:
        started.append(start(**kwargs))
        return started[-1]

    yield factory
    for sd in started:
        sd.stop()


@pytest.fixture
def standin_factory(tmp_path: Path) -> Iterator[Callable[..., StandIn]]:
    """``standin_factory(env=..., models=..., extra_args=..., custom_node_dirs=..., wait=...)``."""
    yield from stopped_at_teardown(lambda **kwargs: start_standin(tmp_path, **kwargs))


@pytest.fixture
def standin(standin_factory: Callable[..., StandIn]) -> StandIn:
    """A default stand-in ComfyUI (no models) serving on a free port."""
    return standin_factory()


@pytest.fixture(scope="session", params=["standin", pytest.param("real", marks=pytest.mark.real)])
def comfy(request: pytest.FixtureRequest) -> ComfyTarget:
    """The ComfyUI under test: the stand-in in ``make test``, the real ComfyUI in ``make test-real``.

    A test that runs on the real one says so through this parameter's ``real`` marker; when the real ComfyUI
    has not been prepared, such a test fails saying how to prepare it (it is never skipped silently)."""
    if request.param == "standin":
        return STANDIN_TARGET
    target = real_target()
    if target is None:
        from tests.helpers.real_comfyui import not_prepared_message

        pytest.fail(not_prepared_message(), pytrace=False)
    return target


@pytest.fixture
def comfy_factory(comfy: ComfyTarget, tmp_path: Path) -> Iterator[Callable[..., StandIn]]:
    """``standin_factory`` for the ``comfy`` target: the stand-in or the real ComfyUI, started the same way
    (the protocol conformance checks use it, so they run against both)."""
    yield from stopped_at_teardown(lambda **kwargs: start_comfyui(comfy, tmp_path, **kwargs))


@pytest.fixture
def comfyui(comfy_factory: Callable[..., StandIn]) -> StandIn:
    """A default ComfyUI of the ``comfy`` target (no models) serving on a free port: ``standin`` for both."""
    return comfy_factory()
