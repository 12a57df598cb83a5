"""Shared pytest fixtures. ``standin``: a stand-in ComfyUI process for one test, stopped at teardown;
``standin_factory``: start several / with options (env, models, custom nodes, extra args)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.standin import StandIn, start_standin


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
