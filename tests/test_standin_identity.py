"""The stand-in says it is the stand-in, in one line at start-up; its other lines stay as ComfyUI prints them.
Seen where a user sees it: the stand-in's own output, and the worker's log (`make dev`), where ComfyUI's lines
are prefixed with [comfyui]."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.standin import StandIn
from tests.helpers.worker import WorkerProcess, worker_env

pytestmark = pytest.mark.timeout(60)

IDENTITY = ("[standin] this is the stand-in ComfyUI (tests/standin), not ComfyUI: no torch, no GPU; model nodes "
            "return synthetic results")
# ComfyUI 0.3.64's start-up lines on a CPU machine, in order (the stand-in prints these exactly).
COMFYUI_START = ("Total VRAM ", "pytorch version: ", "Set vram state to: DISABLED", "Device: cpu", "Python version: ",
                 "ComfyUI version: ", "ComfyUI frontend version: ")


def test_the_first_line_says_it_is_the_stand_in_and_the_rest_are_comfyuis(standin: StandIn) -> None:
    lines = standin.log_text().splitlines()
    assert lines[0] == IDENTITY, lines[:3]
    own = [line for line in lines if line.startswith("[standin] ") or "stand-in" in line.lower()]
    assert [line for line in own if not line.startswith("[standin] serving since ")] == [IDENTITY], own
    banner = [line for line in lines[1:] if line.startswith(COMFYUI_START)]
    assert [next(p for p in COMFYUI_START if line.startswith(p)) for line in banner] == list(COMFYUI_START), banner


def test_the_workers_log_shows_the_line_among_comfyuis(tmp_path: Path) -> None:
    worker = WorkerProcess(worker_env(tmp_path), tmp_path / "worker.log")
    try:
        worker.wait_state("ready")
        log = worker.log_text()
    finally:
        worker.cleanup()
    assert f"[comfyui] {IDENTITY}" in log, log[-3000:]
