"""The first `make dev`/`make test` creates .venv: it says so while it works (not ~45 s of silence), and building
the worker's own package prints no setuptools warnings about our pyproject.toml."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(180)


def test_make_venv_says_what_it_does_while_it_creates_the_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "VENV", "PYTHON")}
    started = time.monotonic()
    proc = subprocess.Popen(["make", "--no-print-directory", "-C", str(ROOT), "venv", f"VENV={venv}",
                             f"PYTHON={sys.executable}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().rstrip("\n")
        took = time.monotonic() - started
        still_working = proc.poll() is None and not (venv / ".installed").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # before pip reaches the package (its egg-info would land in the checkout)
        proc.wait(10)
    assert first.startswith(f">> creating/updating the virtual environment in {venv} with Python 3."), first
    assert "about a minute the first time" in first, first
    assert took < 5, f"the first line came after {took:.1f} s"
    assert still_working, "the line must come while the venv is being made, not after"


def test_make_venv_refuses_a_python_older_than_3_11_in_one_line(tmp_path: Path) -> None:
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.10.12' && exit 0\nexit 1\n")
    old.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "VENV", "PYTHON")}
    run = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "venv", f"VENV={tmp_path / 'venv'}",
                          f"PYTHON={old}"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert run.stderr.splitlines()[0] == (f"venv: the worker needs Python 3.11+; {old} is Python 3.10.12: set PYTHON, "
                                          "e.g. make venv PYTHON=python3.11"), run.stderr
    assert not (tmp_path / "venv").exists()


def test_the_build_backend_supports_the_license_expression() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str), "an SPDX expression, not a TOML table (deprecated)"
    assert project["build-system"]["requires"] == ["setuptools>=77"], "SPDX license expressions need setuptools 77+"


def test_make_venv_builds_the_worker_package_without_setuptools_warnings(tmp_path: Path) -> None:
    """`make venv` itself, on a copy of the project (the editable build writes its egg-info beside pyproject.toml,
    which must not be the checkout), with PIP_NO_DEPS=1 so that only our package is built and installed."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("Makefile", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, copy / name)
    shutil.copytree(ROOT / "supervisor", copy / "supervisor", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "VENV", "PYTHON")}
    run = subprocess.run(["make", "--no-print-directory", "-C", str(copy), "venv", f"PYTHON={sys.executable}"],
                         env={**env, "PIP_NO_DEPS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, capture_output=True,
                         text=True, timeout=170)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    ours = [line for line in output.splitlines() if line.startswith(">> ")]
    assert [line.split(" ", 2)[1] for line in ours] == ["creating/updating", ".venv:", ".venv"], ours
    # pip's own notes about this machine's pip configuration ("WARNING: Location ... is ignored") aside
    rest = [line for line in output.splitlines() if not line.startswith((">> ", "WARNING: Location "))]
    assert not rest, "\n".join(rest)
    assert (copy / ".venv" / ".installed").exists()
