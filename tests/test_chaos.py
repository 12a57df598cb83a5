"""The chaos soak's CI version: ``scripts/chaos.py --quick`` (about 60 jobs while ComfyUI is killed and stopped a
few times) through the self-hosted API of a real worker. Required: 0 lost, 0 hung, 0 leaked, 0 unexplained.

The full soak (500 jobs, at least 20 kills and 20 stops) is ``make chaos``; its results are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("fleet", [1, 2], ids=["one-worker", "fleet-of-2"])
def test_quick_chaos_soak_keeps_every_required_zero(tmp_path: Path, fleet: int) -> None:
    """``fleet-of-2``: two workers on a throwaway PostgreSQL (make chaos FLEET=2, docs/fleet.md)."""
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos.py"), "--quick", "--json", str(out), "--no-markdown",
         "--workdir", str(tmp_path / "work"), "--progress-s", "5", "--fleet", str(fleet)],
        cwd=ROOT, capture_output=True, text=True, timeout=220,
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert out.exists(), f"the soak wrote no results (exit {proc.returncode}):\n{report}"
    result = json.loads(out.read_text())
    figures = result["figures"]
    assert {k: figures[k] for k in ("lost", "hung", "leaked", "unexplained")} == \
        {"lost": 0, "hung": 0, "leaked": 0, "unexplained": 0}, report
    assert proc.returncode == 0, f"problems: {result['problems']}\n{report}"
    # the soak really did what it says: every job ran, ComfyUI was killed and stopped, every output was checked
    assert figures["jobs_submitted"] == figures["jobs_planned"] == 60, report
    assert figures["kills_injected"] >= 3 and figures["stops_injected"] >= 3, report
    assert figures["restarts_seen"] >= figures["kills_injected"] + figures["stops_injected"], report
    assert figures["completed"] == figures["completed_verified"] > 0, report
    assert figures["timed_out"] > 0, report  # the deadline jobs
    assert figures["worker_exit_code"] == 0, report
    started = figures["jobs_started_per_worker"]
    assert len(started) == fleet and all(n > 0 for n in started), report  # a fleet: each worker took jobs
