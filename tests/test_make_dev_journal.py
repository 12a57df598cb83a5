"""`make dev` starts with an empty job journal (a job of an earlier run is not shown as already completed), unless
told to keep it: `make dev KEEP_JOURNAL=1`. Its data lives in DEV_DATA, outside the checkout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.api import Api
from tests.helpers.make_dev import make_dev, make_dev_env
from tests.helpers.worker import ROOT

pytestmark = pytest.mark.timeout(180)

REQUEST = json.loads((ROOT / "examples" / "runsync_no_models.json").read_text())


def run_a_job(api: Api) -> str:
    body = api.ok("POST", "/runsync", REQUEST)
    assert body["status"] == "COMPLETED", body
    return body["id"]


def test_each_make_dev_starts_with_an_empty_journal_unless_kept(tmp_path: Path) -> None:
    env = make_dev_env(tmp_path)
    with make_dev(tmp_path, env=env, log_name="first.log") as dev:
        api = Api(dev.api_url)
        first = run_a_job(api)
        assert api.ok("GET", f"/status/{first}")["status"] == "COMPLETED"
    assert "the job journal starts empty (KEEP_JOURNAL=1 keeps it)" in dev.log_text()

    with make_dev(tmp_path, "KEEP_JOURNAL=1", env=env, log_name="kept.log") as dev:
        api = Api(dev.api_url)
        assert api.ok("GET", f"/status/{first}")["status"] == "COMPLETED", "KEEP_JOURNAL=1 keeps earlier jobs"
        second = run_a_job(api)
    assert "keeping the job journal of earlier runs" in dev.log_text()

    with make_dev(tmp_path, env=env, log_name="fresh.log") as dev:
        api = Api(dev.api_url)
        for old in (first, second):
            status, body = api.get(f"/status/{old}")
            assert status == 404, (status, body)
