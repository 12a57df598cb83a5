"""The README's quick start block (```` ```bash readme-quickstart ````), run verbatim against any worker."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```bash readme-quickstart\n(.*?)^```$", re.S | re.M)
DOCUMENTED_API = "http://127.0.0.1:8000"
OUT = "/tmp/comfyui-quickstart"  # where the block writes response.json and the image


def quickstart(path: Path) -> str | None:
    match = BLOCK.search(path.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def run_quickstart(api_url: str, out: Path) -> subprocess.CompletedProcess[str]:
    """The README's block under ``bash -euo pipefail`` from the checkout's root, as a user runs it, with only the
    documented API address and output folder replaced (by ``api_url`` and ``out``)."""
    script = quickstart(ROOT / "README.md") or quickstart(ROOT / "docs" / "api.md")
    assert script and DOCUMENTED_API in script and OUT in script, (
        f"the quick start no longer talks to {DOCUMENTED_API} and writes into {OUT}: update tests/helpers/readme.py")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace(DOCUMENTED_API, api_url).replace(OUT, str(out))],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "STANDIN_"))})
