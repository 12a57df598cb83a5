"""What the tests leave in the checkout: nothing. ``git status --ignored`` before and after tells."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Written by Python and pytest themselves, not by a test (`make test` turns both off).
# The virtual environment the suite runs in is not its output (a `pip install` beside a run changes it).
NOT_BY_TESTS = ("__pycache__/", ".pytest_cache/")
ENVIRONMENT = ".venv/"


def cache_home() -> Path:
    """Where the suite keeps what it keeps between runs (Hypothesis' example database): outside the checkout."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "comfyui-worker"


def checkout_entries() -> set[str] | None:
    """Every untracked and every ignored path of the checkout, or None outside a git checkout."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    proc = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    return {line for line in proc.stdout.splitlines()
            if line[:2] in ("??", "!!") and not any(part in line for part in NOT_BY_TESTS)
            and not line[3:].lstrip('"').startswith(ENVIRONMENT)}
