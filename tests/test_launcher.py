"""The fork launcher (supervision/launcher.py, zygote.py) driven as real processes over a real control socket.

A probe program stands in for ComfyUI's ``main.py``: it reports, as one JSON line, what a forked ComfyUI would
see (its fds, the root logger, its random generators, CUDA's fork state, argv, cwd, environment). Modules that
misbehave at import (one calls ``torch.cuda.is_available()``, one configures logging, one registers an exit
handler) sit on PYTHONPATH outside the "ComfyUI" folder, so the first child records them as third-party and the
parent preloads them, as it would any library. The tests that need numpy and torch use the real ComfyUI's
interpreter (``make test-real``); the rest run in ``make test`` with the worker's.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.supervision.launcher import ForkLauncher
from tests.helpers.comfy_targets import ComfyTarget

pytestmark = pytest.mark.timeout(240)

PROBE_MAIN = r'''
import atexit, json, logging, os, random, sys, time
early = sorted(m for m in ("numpy", "torch", "touches_cuda", "configures_logging", "registers_atexit") if m in sys.modules)
report = {"preloaded": early, "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
          "handlers": len(logging.root.handlers), "random": random.random(), "argv": sys.argv[1:],
          "cwd": os.getcwd(), "probe": os.environ.get("PROBE"), "pid": os.getpid(), "path0": sys.path[0],
          "cmdline": open("/proc/self/cmdline").read().rstrip("\0").split("\0")}
for name in os.environ.get("PROBE_IMPORTS", "").split(","):
    if name:
        __import__(name)
if "numpy" in sys.modules:
    import numpy
    report["numpy"] = int(numpy.random.randint(0, 2**31))
if "torch" in sys.modules:
    import torch
    report["torch"] = int(torch.randint(0, 2**31, (1,)))
    report["bad_fork"] = torch.cuda._is_in_bad_fork()
print(json.dumps(report), flush=True)
time.sleep(float(os.environ.get("PROBE_HOLD", "0")))
'''

LIBS = {
    "touches_cuda.py": "import torch\nAVAILABLE = torch.cuda.is_available()\n",
    "configures_logging.py": "import logging\nlogging.basicConfig(level=logging.INFO)\n",
    "registers_atexit.py": (
        "import atexit, os\n"
        "MARK = os.environ['ATEXIT_MARK']\n"
        "atexit.register(lambda: open(MARK + '.' + str(os.getpid()), 'w').close())\n"
    ),
}


# What reaches the CUDA driver from Python: a torch._C._cuda_* binding (all but compile-time constants), or one
# of torch.cuda's entry points that call one (on a CUDA build; on any build they are what initialises CUDA).
COMPILE_TIME = {"torch._C._cuda_getCompiledVersion"}
DRIVER_ENTRIES = {"is_available", "device_count", "init", "_lazy_init", "current_device", "set_device",
                  "synchronize", "get_device_properties", "get_device_name", "get_device_capability", "mem_get_info",
                  "manual_seed", "manual_seed_all", "seed", "seed_all", "empty_cache", "memory_allocated"}


def driver_calls(trace: Path) -> list[str]:
    """The calls of a parent's CUDA trace (zygote.CudaTracer) that touch, or would touch, the driver."""
    calls = json.loads(trace.read_text())["calls"]
    return [c for c in calls if (c.startswith("torch._C._cuda_") and c not in COMPILE_TIME)
            or (c.startswith("torch.cuda:") and c.split(":", 1)[1] in DRIVER_ENTRIES)]


def _layout(tmp_path: Path) -> tuple[Path, Path]:
    comfy = tmp_path / "comfy"
    libs = tmp_path / "libs"
    comfy.mkdir()
    libs.mkdir()
    (comfy / "main.py").write_text(PROBE_MAIN)
    for name, code in LIBS.items():
        (libs / name).write_text(code)
    return comfy, libs


class Probe:
    """A launcher over the probe program; each fork's JSON report collected from its stdout."""

    def __init__(self, tmp_path: Path, python: str, imports: str, **diagnostics: Any) -> None:
        self.comfy, libs = _layout(tmp_path)
        self.atexit_mark = tmp_path / "atexit"
        self.env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(libs), "PROBE_IMPORTS": imports,
                    "ATEXIT_MARK": str(self.atexit_mark), "PYTHONDONTWRITEBYTECODE": "1"}
        self.launcher = ForkLauncher(python, self.comfy, tmp_path / "data", [], self.env, diagnostics=diagnostics)
        self.python = python

    async def run(self, hold: float = 0.0, **env: str) -> tuple[dict[str, Any], list[str]]:
        """Fork one probe, wait for its exit; its report and its stderr lines."""
        out: list[str] = []
        err: list[str] = []
        proc = await self.launcher.fork(
            [self.python, str(self.comfy / "main.py"), "--port", "1"], cwd=str(self.comfy),
            env={**self.env, "PROBE_HOLD": str(hold), **env}, marker="m", sink=lambda s, line: (out if s == "stdout" else err).append(line),
            timeout=60)
        status = await asyncio.wait_for(proc.wait(), 60)
        await asyncio.sleep(0.1)  # the pipes' last bytes
        proc.close()
        assert status.exit_code == 0, (status, out, err)
        reports = [json.loads(line) for line in out if line.startswith("{")]
        assert len(reports) == 1, (out, err)
        return {**reports[0], "returned_pid": proc.pid}, err

    async def preloaded(self, timeout: float = 120) -> dict[str, Any]:
        """Fork a first child that lives long enough to record its modules; wait for the parent to import them."""
        await self.run(hold=2.5)
        for _ in range(int(timeout * 10)):
            if self.launcher.preloaded:
                return self.launcher.preloaded
            await asyncio.sleep(0.1)
        raise AssertionError("the launcher's parent never preloaded the recorded modules")


def _real() -> ComfyTarget:
    """The real ComfyUI (these tests are about its interpreter and its modules; the stand-in has neither)."""
    from tests.helpers.comfy_targets import real_target

    target = real_target()
    if target is None:
        from tests.helpers.real_comfyui import not_prepared_message

        pytest.fail(not_prepared_message())
    return target


def _real_python() -> str:
    return _real().python


async def test_a_forked_child_is_its_own_process_with_only_its_own_fds(tmp_path: Path) -> None:
    probe = Probe(tmp_path, sys.executable, "configures_logging,registers_atexit")
    try:
        info = await probe.preloaded()
        assert not info["failed"], info
        first, _ = await probe.run(PROBE="one")
        second, _ = await probe.run(PROBE="two")
        for report in (first, second):
            assert report["pid"] == report["returned_pid"]  # the supervisor watches the process ComfyUI runs in
            assert report["fds"][:3] == [0, 1, 2] and len(report["fds"]) <= 4, report["fds"]  # + listdir's own
            assert report["handlers"] == 0  # the parent's preloaded logging set-up is not inherited
            assert set(report["preloaded"]) == {"configures_logging", "registers_atexit"}
            assert report["argv"] == ["--port", "1", "--disable-cuda-malloc"]
            # what ps and psutil show is ComfyUI's command line, not the parent's
            assert report["cmdline"] == [sys.executable, str(probe.comfy / "main.py"), *report["argv"]]
            assert report["cwd"] == str(probe.comfy) and report["path0"] == str(probe.comfy)
        assert (first["probe"], second["probe"]) == ("one", "two")  # each its own environment
        assert first["random"] != second["random"]
        # the children left with os._exit: an exit handler a preloaded module registered never ran in them
        assert not list(tmp_path.glob("atexit.*"))
    finally:
        await probe.launcher.close()


async def test_a_killed_parent_takes_its_child_down_and_is_started_again(tmp_path: Path) -> None:
    probe = Probe(tmp_path, sys.executable, "")
    try:
        proc = await probe.launcher.fork(
            [sys.executable, str(probe.comfy / "main.py")], cwd=str(probe.comfy),
            env={**probe.env, "PROBE_HOLD": "60"}, marker="m", sink=lambda s, line: None, timeout=60)
        parent = probe.launcher.pid
        assert parent is not None
        import os
        import signal

        os.kill(parent, signal.SIGKILL)
        status = await asyncio.wait_for(proc.wait(), 10)
        assert status.signal == signal.SIGKILL
        proc.close()
        again, _ = await probe.run()
        assert probe.launcher.pid != parent
    finally:
        await probe.launcher.close()


@pytest.mark.real
async def test_children_are_reseeded_and_cuda_is_never_touched_in_the_parent(tmp_path: Path) -> None:
    """numpy and torch generators differ per child; torch.cuda is not in a bad fork; the parent's CUDA trace is
    empty although a preloaded module calls torch.cuda.is_available() (the guard leaves it to the child)."""
    trace = tmp_path / "trace.json"
    probe = Probe(tmp_path, _real_python(), "numpy,torch,touches_cuda", trace_cuda=str(trace))
    try:
        info = await probe.preloaded()
        assert "touches_cuda" in info["failed"] and "torch.cuda.is_available" in info["cuda_refused"], info
        assert driver_calls(trace) == []
        a, _ = await probe.run()
        b, _ = await probe.run()
        assert {"numpy", "torch"} <= set(a["preloaded"]) and "touches_cuda" not in a["preloaded"]
        assert a["numpy"] != b["numpy"] and a["torch"] != b["torch"] and a["random"] != b["random"]
        assert a["bad_fork"] is False and b["bad_fork"] is False
    finally:
        await probe.launcher.close()


@pytest.mark.real
async def test_the_cuda_trace_sees_a_call_when_the_guard_is_off(tmp_path: Path) -> None:
    """The tracer is not blind: without the guard the same module's call shows in the parent's trace."""
    trace = tmp_path / "trace.json"
    probe = Probe(tmp_path, _real_python(), "torch,touches_cuda", trace_cuda=str(trace), cuda_guard=False)
    try:
        await probe.preloaded()
        assert "torch.cuda:is_available" in driver_calls(trace)
    finally:
        await probe.launcher.close()


@pytest.mark.real
async def test_the_real_comfyuis_third_party_modules_make_no_cuda_call_in_the_parent(tmp_path: Path) -> None:
    """The module list a real ComfyUI boot recorded, imported in the parent with the guard off and traced."""
    comfy = _real()
    trace = tmp_path / "trace.json"
    data = tmp_path / "data"
    for sub in ("input", "output", "user"):
        (data / sub).mkdir(parents=True)
    launcher = ForkLauncher(comfy.python, comfy.comfyui_dir, data, ["--cpu"], {"PATH": "/usr/bin:/bin"},
                            diagnostics={"trace_cuda": str(trace), "cuda_guard": False})
    from tests.helpers.standin import free_port

    argv = [comfy.python, str(comfy.comfyui_dir / "main.py"), "--listen", "127.0.0.1", "--port", str(free_port()),
            "--input-directory", str(data / "input"), "--output-directory", str(data / "output"),
            "--temp-directory", str(data), "--user-directory", str(data / "user"),
            "--database-url", f"sqlite:///{data / 'user' / 'comfyui.db'}", "--cpu"]
    try:
        proc = await launcher.fork(argv, cwd=str(comfy.comfyui_dir), env={"PATH": "/usr/bin:/bin"}, marker="m",
                                   sink=lambda s, line: None, timeout=60)
        for _ in range(1800):
            if launcher.preloaded:
                break
            await asyncio.sleep(0.1)
        assert launcher.preloaded and launcher.preloaded["modules"] > 1000, launcher.preloaded
        assert "torch" in json.dumps(launcher.preloaded) or launcher.preloaded["total"] > 1000
        assert driver_calls(trace) == [], "a CUDA call in the parent"
        await proc.kill(5)
        proc.close()
    finally:
        await launcher.close()


@pytest.mark.real
async def test_a_forked_real_comfyui_restarts_in_a_fraction_of_its_cold_boot(tmp_path: Path) -> None:
    """kill -9 -> ready again, forked from the preloaded parent: a generous bound (the benchmark measures it; the
    stand-in's 0.4 s boot is too short to compare)."""
    comfy = _real()
    import os
    import signal
    import statistics
    import time

    from tests.helpers.worker import running_supervisor, worker_env

    env = worker_env(tmp_path, COMFYUI_LAUNCH="fork", CRASH_LOOP_WINDOW_S="1", **comfy.env)
    with running_supervisor(env) as sup:
        started = time.monotonic()
        await sup.wait_ready(comfy.start_timeout_s)
        cold = time.monotonic() - started
        for _ in range(int(comfy.start_timeout_s * 10)):
            info = sup.launcher_info()
            if info and info["preloaded"]:
                break
            await asyncio.sleep(0.1)
        assert info and info["preloaded"] and info["preloaded"]["modules"] > 1000, info
        restarts = []
        for _ in range(3):
            await asyncio.sleep(1.1)  # each kill a first failure: restarted at once
            status = sup.status()
            killed = time.monotonic()
            os.kill(status.pid, signal.SIGKILL)
            await sup.wait_exit(status.generation)
            again = await sup.wait_ready(comfy.start_timeout_s)
            restarts.append(time.monotonic() - killed)
            assert again.generation == status.generation + 1 and again.pid != status.pid
        assert statistics.median(restarts) < 0.6 * cold, (restarts, cold)


async def test_an_interpreter_the_parent_cannot_run_in_falls_back_to_exec(tmp_path: Path) -> None:
    """COMFYUI_PYTHON that cannot run the launcher's parent (here: one that exits at once, as a too old Python
    would at its syntax) still starts ComfyUI, with exec, and says so once."""
    import logging

    from tests.helpers.worker import running_supervisor, worker_env

    python = tmp_path / "python"
    # runs main.py like the worker's interpreter, but refuses the launcher's script
    python.write_text(f"#!/bin/sh\ncase \"$1\" in *zygote.py) echo 'SyntaxError: invalid syntax' >&2; exit 1;; esac\n"
                      f"exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("supervisor").addHandler(handler)
    try:
        env = worker_env(tmp_path, COMFYUI_LAUNCH="fork", COMFYUI_PYTHON=str(python))
        with running_supervisor(env) as sup:
            status = await sup.wait_ready(30)
            assert status.generation == 1 and sup.launcher_info() is None
        assert any("fork mode does not work with" in r and "started with exec from now on" in r for r in records), records
    finally:
        logging.getLogger("supervisor").removeHandler(handler)


@pytest.mark.real
@pytest.mark.parametrize("flags", [[], ["--cuda-malloc"], ["--disable-cuda-malloc"]])
def test_the_parents_cuda_malloc_decision_is_comfyuis_own(flags: list[str]) -> None:
    """The allocator setting the parent applies before importing torch equals what ComfyUI's cuda_malloc.py sets
    in an exec'd ComfyUI, for the same flags, in the same interpreter."""
    comfy = _real()
    import subprocess

    from supervisor.supervision import launcher

    env = {"PATH": "/usr/bin:/bin"}  # -B below: importing zygote by name must leave no __pycache__ in the checkout
    theirs = subprocess.run(
        [comfy.python, "-c", "import os, sys; sys.argv = ['main.py', *sys.argv[1:]]; import comfy.options; "
         "comfy.options.enable_args_parsing(); import cuda_malloc; "
         "print('CONF', os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))", *flags],
        cwd=comfy.comfyui_dir, env=env, capture_output=True, text=True, timeout=120, check=True)
    ours = subprocess.run(
        [comfy.python, "-B", "-c", f"import sys; sys.path.insert(0, {str(launcher.ZYGOTE_SCRIPT.parent)!r}); import zygote; "
         f"print('CONF', zygote.cuda_malloc_env({str(comfy.comfyui_dir)!r}, sys.argv[1:]).get('PYTORCH_CUDA_ALLOC_CONF'))",
         *flags], env=env, capture_output=True, text=True, timeout=120, check=True)
    conf = [line for line in theirs.stdout.splitlines() if line.startswith("CONF ")]
    assert conf and conf[-1] == ours.stdout.strip(), (theirs.stdout, ours.stdout)
