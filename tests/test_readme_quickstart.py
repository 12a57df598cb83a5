"""The quick start works as written: ``make dev``, then the documented curl sequence returns an image.

The sequence is the ```` ```bash readme-quickstart ```` block of docs/api.md, and of README.md when the README
carries it (then both must be the same text). It runs verbatim under ``bash -euo pipefail``, except that the
port 8000 is replaced by a free one and the block's output folder (``/tmp/comfyui-quickstart``) by one of the
test's, against ``make dev`` itself (``-o .venv/.installed``: the test never reinstalls the virtual
environment; ``DEV_DATA`` in the test's folder). ``.ci/run`` runs the README's block the same way on a fresh
clone. Neither ``make dev`` nor the block writes into the checkout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.checkout import checkout_entries
from tests.helpers.make_dev import make_dev
from tests.helpers.readme import quickstart, run_quickstart
from tests.helpers.worker import ROOT

pytestmark = pytest.mark.timeout(120)


def test_the_readme_and_api_doc_show_the_same_sequence() -> None:
    documented = quickstart(ROOT / "docs" / "api.md")
    assert documented and "make dev" not in documented and "/runsync" in documented
    readme = quickstart(ROOT / "README.md")
    if readme is None:
        pytest.skip("README.md does not carry the ```bash readme-quickstart block yet (docs/api.md does)")
    assert readme == documented


def test_make_dev_then_the_documented_curl_returns_an_image(tmp_path: Path) -> None:
    out = tmp_path / "quickstart"
    before = checkout_entries()
    with make_dev(tmp_path) as dev:
        run = run_quickstart(dev.api_url, out)
        assert run.returncode == 0, run.stdout + run.stderr
    assert (out / "response.json").is_file()
    saved = out / "example_00001_.png"
    assert f"{saved.name} (" in run.stdout, run.stdout
    with Image.open(saved) as img:
        assert img.format == "PNG" and img.size == (512, 512)
    assert "API listening on http://127.0.0.1:" in dev.log_text()
    assert (tmp_path / "dev" / "jobs.sqlite3").is_file(), "make dev keeps its data in DEV_DATA"
    assert checkout_entries() == before, "make dev or the quick start wrote into the checkout"
