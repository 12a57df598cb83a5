"""`fetch_models.py check` runs with any Python 3.11+ that has PyYAML and imports nothing else; without PyYAML
it exits 3 with one line saying what to install. Run as a user runs it: a fresh venv with no packages at all
(``python -m venv --without-pip``), PyYAML added to it or not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fetch_models.py"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python 3.11+ with nothing installed: a venv without pip, made from the interpreter running the tests."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def pyyaml_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding PyYAML and nothing else, to put on PYTHONPATH."""
    site = tmp_path_factory.mktemp("pyyaml")
    shutil.copytree(Path(yaml.__file__).parent, site / "yaml")
    return site


def run_check(python: Path | str, pythonpath: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MODELS_MANIFEST")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([str(python), *args, str(SCRIPT), "check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


# `python scripts/fetch_models.py check`, then where every module loaded came from, printed at exit.
LIST_MODULES = """import atexit, runpy, sys
atexit.register(lambda: print("FILES", *sorted({getattr(m, "__file__", None) or "-" for m in list(sys.modules.values())}),
                              sep="\\n", file=sys.stderr))
sys.argv = [sys.argv[1], "check"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_check_runs_with_pyyaml_and_the_standard_library_alone(bare_python: Path, pyyaml_only: Path) -> None:
    run = run_check(bare_python, str(pyyaml_only))
    assert run.returncode == 0, run.stderr
    assert f"fetch_models: {ROOT / 'models.yaml'}: " in run.stderr and "entries, valid" in run.stderr
    listed = subprocess.run([str(bare_python), "-c", LIST_MODULES, str(SCRIPT)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(pyyaml_only)})
    assert listed.returncode == 0, listed.stderr
    files = listed.stderr.split("FILES\n", 1)[1].split()
    allowed = (sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"), str(pyyaml_only),
               str(ROOT / "scripts"))
    foreign = [f for f in files if f != "-" and not f.startswith(allowed)]
    assert any(f.startswith(str(pyyaml_only)) for f in files), "PyYAML was not even loaded"
    assert not foreign, f"check loaded more than the standard library and PyYAML: {foreign}"


def test_without_pyyaml_check_exits_3_with_one_line_saying_what_to_install(bare_python: Path) -> None:
    run = run_check(bare_python, None)
    assert run.returncode == 3, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"fetch_models: error: {bare_python} cannot import 'yaml' (package PyYAML); "
                               f"install it: {bare_python} -m pip install 'PyYAML==6.0.3'"), lines[0]
    assert "Traceback" not in run.stderr


def test_the_exit_codes_0_and_2_keep_their_meaning(bare_python: Path, pyyaml_only: Path, tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("version: 1\nmodels:\n  - {name: x, folder: lora, filename: a, hf: {repo: o/n, file: a}}\n")
    env_run = subprocess.run([str(bare_python), str(SCRIPT), "check", "--manifest", str(bad)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(pyyaml_only)}, capture_output=True, text=True,
                             timeout=60)
    assert env_run.returncode == 2, env_run.stderr
    assert "field 'folder': 'lora' is not a known model folder" in env_run.stderr


@pytest.mark.parametrize("python", ["/usr/bin/python3.11", "/usr/bin/python3"])
def test_the_systems_own_python_runs_check_when_it_has_pyyaml(python: str) -> None:
    """The README's first build step, `python3 scripts/fetch_models.py check`, with the distribution's Python."""
    if not Path(python).exists():
        pytest.skip(f"no {python} here")
    has_yaml = subprocess.run([python, "-c", "import yaml"], capture_output=True, timeout=30).returncode == 0
    run = run_check(python, None)
    if has_yaml:
        assert run.returncode == 0, run.stderr
    else:
        assert run.returncode == 3 and "apt install python3-yaml" in run.stderr, run.stderr
