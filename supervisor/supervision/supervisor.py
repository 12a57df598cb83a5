"""The supervisor: owns the ComfyUI process for the life of the worker.

It runs on its own thread with its own event loop. The RunPod SDK insists on owning the main thread's loop
(it calls ``asyncio.run`` itself and installs its own signal handlers), and the self-hosted API has a loop
of its own too; a supervisor on its own thread serves both unchanged. The rest of the worker talks to it
only through the thread-safe :class:`~supervisor.comfy.status.ComfyHandle` methods below.

Lifecycle of one generation (one ComfyUI process)::

    spawn -> wait for /system_stats 200 -> check required classes -> warm-up -> READY | DEGRADED
          -> watch (exit noticed at once; probe every HEALTH_INTERVAL_S) -> exit | hung | stop

A generation that ends without a stop request is a failure: the first restart is immediate, later ones
back off exponentially up to a cap, and CRASH_LOOP_MAX failures within CRASH_LOOP_WINDOW_S make the state
FAILED (the worker then exits non-zero so the platform replaces it).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from supervisor.config import Settings
from supervisor.metrics import WorkerMetrics
from supervisor.supervision.launcher import ForkLauncher, LaunchError
from supervisor.supervision.leftover import remove_pid_file, write_pid_file
from supervisor.supervision.model_paths import write_extra_model_paths
from supervisor.supervision.process import ComfyProcess, ExitStatus, LogRing
from supervisor.comfy.status import CrashInfo, State, Status
from supervisor.supervision.warmup import WarmupError, run_warmup
from supervisor.comfy.node_classes import required_classes

log = logging.getLogger("supervisor")
comfy_log = logging.getLogger("comfyui")

IMPORT_FAILURE_MARKERS = ("IMPORT FAILED", "Cannot import ")
RESTARTED = "restarted on request"  # the reason of a generation ended by ComfyHandle.restart


class ComfySupervisor:
    """Starts, health-checks, restarts and stops ComfyUI. Every public method is safe from any thread."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics | None = None, instance: str = "0") -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics.disabled()
        self.instance = instance  # the ``instance`` label; settings are this instance's (Settings.for_instance)
        self.metrics.declare_instance(instance)
        # With several instances every log line says which one it is about.
        self._who = "ComfyUI" if settings.instances == 1 else f"ComfyUI {instance}"
        self._line_prefix = "[comfyui]" if settings.instances == 1 else f"[comfyui {instance}]"
        self._lock = threading.Lock()
        self._state = State.STARTING
        self._generation = 0
        self._restarts = 0
        self._pid: int | None = None
        self._spawned_at: float | None = None
        self._last_exit: CrashInfo | None = None
        self._missing: tuple[str, ...] = ()
        self._import_failures: list[str] = []
        self._message = "starting ComfyUI"
        self._ring = LogRing(settings.log_ring_lines)
        self._ready_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Status]]] = []
        self._exits: collections.OrderedDict[int, CrashInfo] = collections.OrderedDict()
        self._exit_waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[CrashInfo]]]] = {}
        self._listeners: list[Callable[[Status], None]] = []
        self._failures: collections.deque[float] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._restart_asked: asyncio.Future[str] | None = None  # this generation's restart request (its reason)
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._state_file = StateFileWriter(settings.state_file)
        self._launcher: ForkLauncher | None = None  # fork mode's pre-imported parent (launcher.py)
        if settings.comfyui_launch == "fork":
            self._launcher = ForkLauncher(settings.comfyui_python, settings.comfyui_dir, settings.data_dir,
                                          settings.comfyui_args, settings.child_env, settings.launch_gc_freeze)

    # ------------------------------------------------------------------------------------------------
    # Thread-safe API
    # ------------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.settings.comfyui_url

    def start(self) -> None:
        """Spawn ComfyUI on the supervisor's own thread and return at once."""
        if self._thread is not None:
            raise RuntimeError("the supervisor was already started")
        self._write_state_file(self.status())
        self._thread = threading.Thread(target=self._thread_main, name=f"comfy-supervisor-{self.instance}",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def request_stop(self) -> None:
        """Start stopping ComfyUI and return at once (a pool asks every instance before waiting for any)."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not self._done.is_set():
            self._set_state(State.STOPPING, "stopping ComfyUI")
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass

    def stop(self, timeout: float | None = None) -> None:
        """Stop ComfyUI (SIGINT, SIGTERM, SIGKILL on the tree) and the supervisor thread. Blocking; idempotent."""
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            limit = timeout if timeout is not None else self.settings.stop_timeout_s * 2 + 15
            self._done.wait(limit)
            self._thread.join(1.0)
        self._state_file.close()

    def begin_shutdown(self) -> None:
        """Refuse new jobs from now on (state STOPPING) while running jobs drain; ComfyUI keeps running."""
        if self._state is not State.FAILED:
            self._set_state(State.STOPPING, "shutting down: no new jobs")

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Blocking: True once the supervisor has ended (failed, or stopped)."""
        return self._done.wait(timeout)

    def status(self) -> Status:
        with self._lock:
            return self._status_locked()

    def launcher_info(self) -> dict[str, Any] | None:
        """Fork mode: the launcher's parent (pid) and its last preload report (None before one); None in exec mode."""
        launcher = self._launcher
        if launcher is None:
            return None
        return {"pid": launcher.pid, "preloaded": launcher.preloaded}

    def log_tail(self, n: int = 20) -> list[str]:
        return self._ring.explanatory_tail(n)

    def add_listener(self, listener: Callable[[Status], None]) -> None:
        """Call ``listener(status)`` on every state change (from the supervisor's thread: keep it quick)."""
        self._listeners.append(listener)

    async def wait_ready(self, timeout: float | None) -> Status:
        """Resolve in the caller's loop once ComfyUI serves; TimeoutError, or RuntimeError if it never will."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._state.serving:
                return self._status_locked()
            self._raise_if_final()
            fut: asyncio.Future[Status] = loop.create_future()
            self._ready_waiters.append((loop, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            state = self.status()
            raise TimeoutError(
                f"ComfyUI was not ready within {timeout:g} s (state {state.state.value}: {state.message})"
            ) from None
        finally:
            with self._lock:
                if (loop, fut) in self._ready_waiters:
                    self._ready_waiters.remove((loop, fut))

    async def wait_exit(self, generation: int) -> CrashInfo:
        """Resolve in the caller's loop when that generation's process has ended (at once if it has)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if generation in self._exits:
                return self._exits[generation]
            if generation < self._generation or generation <= 0:
                return CrashInfo(generation, None, None, None, "ended", ())
            fut: asyncio.Future[CrashInfo] = loop.create_future()
            self._exit_waiters.setdefault(generation, []).append((loop, fut))
        return await fut

    async def restart(self, generation: int, reason: str) -> CrashInfo:
        """Kill that generation's tree and start a new one; resolve once it has ended (see ComfyHandle.restart)."""
        loop = self._loop
        with self._lock:
            current = generation == self._generation and generation not in self._exits
        if current and loop is not None:
            try:
                loop.call_soon_threadsafe(self._ask_restart, generation, reason)
            except RuntimeError:  # the supervisor's loop has ended: so has the process
                pass
        return await self.wait_exit(generation)

    def _ask_restart(self, generation: int, reason: str) -> None:
        """On the supervisor's loop: wake the watch of that generation (only if it is still the running one)."""
        fut = self._restart_asked
        if fut is not None and not fut.done() and generation == self._generation:
            fut.set_result(reason)

    # ------------------------------------------------------------------------------------------------
    # State bookkeeping (any thread; mostly the supervisor's)
    # ------------------------------------------------------------------------------------------------

    def _status_locked(self) -> Status:
        uptime = None if self._spawned_at is None or self._pid is None else time.monotonic() - self._spawned_at
        return Status(
            state=self._state,
            pid=self._pid,
            generation=self._generation,
            restarts=self._restarts,
            uptime_s=uptime,
            last_exit=self._last_exit,
            missing_classes=self._missing,
            import_failures=tuple(self._import_failures),
            message=self._message,
        )

    def _raise_if_final(self) -> None:
        if self._state is State.FAILED:
            raise RuntimeError(f"ComfyUI has failed and will not be restarted: {self._message}")
        if self._state is State.STOPPING:
            raise RuntimeError("the worker is shutting down and takes no new jobs")

    def _set_state(self, state: State, message: str) -> None:
        with self._lock:
            if self._state is State.FAILED or (self._state is State.STOPPING and state is not State.FAILED):
                if state is not self._state:
                    return  # final states stick
            old, self._state, self._message = self._state, state, message
            status = self._status_locked()
            waiters = self._ready_waiters[:] if state.serving or state in (State.FAILED, State.STOPPING) else []
            if waiters:
                self._ready_waiters.clear()
        if old is not state:
            level = logging.ERROR if state is State.FAILED else logging.INFO
            log.log(level, "%s %s -> %s: %s", self._who, old.value, state.value, message)
            self.metrics.comfyui_serving(state.serving, self.instance)
        self._write_state_file(status)
        for listener in list(self._listeners):  # before the waiters: whoever wakes up sees listeners up to date
            try:
                listener(status)
            except Exception:  # a broken listener must not break supervision
                log.exception("a supervisor state listener failed")
        for loop, fut in waiters:
            if state.serving:
                _resolve(loop, fut, status)
            else:
                _reject(loop, fut, RuntimeError(f"ComfyUI will not become ready: {message}"))

    def _record_exit(self, info: CrashInfo) -> None:
        with self._lock:
            self._last_exit = info
            self._pid = None
            self._exits[info.generation] = info
            while len(self._exits) > 64:
                self._exits.popitem(last=False)
            waiters = self._exit_waiters.pop(info.generation, [])
        for loop, fut in waiters:
            _resolve(loop, fut, info)

    def _write_state_file(self, status: Status) -> None:
        self._state_file.write(status.to_dict())

    # ------------------------------------------------------------------------------------------------
    # The supervisor's own thread and loop
    # ------------------------------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            log.exception("the supervisor crashed")
            self._set_state(State.FAILED, "the supervisor itself crashed (see the traceback above)")
        finally:
            self._done.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._state is State.STOPPING:  # stop() raced start()
            return
        timeout = aiohttp.ClientTimeout(total=None, connect=None)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            self._http = http
            try:
                await self._supervise()
            finally:
                if self._launcher is not None:
                    await self._launcher.close()

    async def _supervise(self) -> None:
        problem = self._startup_problem()
        if problem:
            self._fail(problem, with_log=False)
            return
        required = await asyncio.to_thread(self._prepare)
        while not self._stopping():
            info = await self._run_generation(required)
            if info is None or self._stopping():
                return
            if info.reason.startswith(RESTARTED):  # asked for, not a failure: start again at once
                continue
            delay = self._after_failure(info)
            if delay is None:
                return
            if delay:
                await self._sleep_unless_stopped(delay)

    def _startup_problem(self) -> str | None:
        s = self.settings
        if not (s.comfyui_dir / "main.py").is_file():
            return (
                f"COMFYUI_DIR={s.comfyui_dir} has no main.py; set COMFYUI_DIR to the folder of ComfyUI's "
                "source (the one that holds main.py), e.g. /opt/ComfyUI or /runpod-volume/ComfyUI"
            )
        return None

    def _prepare(self) -> tuple[str, ...]:
        """Create the writable places ComfyUI gets (all under DATA_DIR) and the model paths file."""
        s = self.settings
        for sub in ("input", "output", "temp", "user"):
            (s.data_dir / sub).mkdir(parents=True, exist_ok=True)
        write_extra_model_paths(s.data_dir / "extra_model_paths.yaml", s.models_dir, s.volume_models_dir)
        return required_classes(s.workflows_dir, s.required_nodes)

    def _argv(self) -> list[str]:
        s = self.settings
        data = s.data_dir
        return [
            s.comfyui_python,
            str(s.comfyui_dir / "main.py"),
            "--listen", s.comfyui_host,
            "--port", str(s.comfyui_port),
            "--disable-auto-launch",
            "--input-directory", str(data / "input"),
            "--output-directory", str(data / "output"),
            "--temp-directory", str(data),  # ComfyUI appends "temp"
            "--user-directory", str(data / "user"),
            "--database-url", f"sqlite:///{data / 'user' / 'comfyui.db'}",
            "--extra-model-paths-config", str(data / "extra_model_paths.yaml"),
            "--verbose", s.comfy_log_level,
            *s.comfyui_args,
        ]  # fmt: skip

    async def _run_generation(self, required: tuple[str, ...]) -> CrashInfo | None:
        """Run one ComfyUI process to its end. Returns why it ended, or None when a stop ended it."""
        with self._lock:
            self._generation += 1
            generation = self._generation
            if generation > 1:
                self._restarts += 1
                self.metrics.comfyui_restarted(restart_reason(self._last_exit), self.instance)
            self._import_failures = []
            self._missing = ()
        marker = uuid.uuid4().hex
        try:
            proc = await self._launch(marker)
        except (OSError, LaunchError) as exc:
            info = CrashInfo(generation, None, None, None, f"could not be started: {exc}", ())
            self._record_exit(info)
            return info
        with self._lock:
            self._pid, self._spawned_at = proc.pid, time.monotonic()
        log.info("started %s (pid %d, generation %d): %s", self._who, proc.pid, generation, " ".join(self._argv()))
        data_dir = self.settings.data_dir
        # so that a worker started after this one was killed -9 recognises this ComfyUI as ours (leftover.py)
        await asyncio.to_thread(write_pid_file, data_dir, proc.pid, proc.environ_marker,
                                self.settings.comfyui_port)
        try:
            return await self._supervise_process(proc, generation, required)
        finally:
            proc.close()
            await asyncio.to_thread(remove_pid_file, data_dir, proc.pid)

    async def _launch(self, marker: str) -> ComfyProcess:
        """Start one ComfyUI: forked from the launcher's parent (COMFYUI_LAUNCH=fork) or exec'd afresh."""
        s = self.settings
        if self._launcher is not None:
            try:
                return await self._launcher.fork(self._argv(), cwd=str(s.comfyui_dir), env=s.child_env,
                                                 marker=marker, sink=self._on_line, timeout=s.start_timeout_s)
            except LaunchError as exc:
                if self._launcher.forks:
                    raise  # it has worked here: a failure like a crash (restarted, counted)
                # never worked with this interpreter (too old, not CPython, ...): exec as before, for good
                log.warning("fork mode does not work with %s (%s); %s is started with exec from now on",
                            s.comfyui_python, exc, self._who)
                await self._launcher.close()
                self._launcher = None
        return await ComfyProcess.spawn(self._argv(), cwd=str(s.comfyui_dir), env=s.child_env, marker=marker,
                                        sink=self._on_line)

    async def _supervise_process(self, proc: ComfyProcess, generation: int, required: tuple[str, ...]) -> CrashInfo | None:
        exited = asyncio.ensure_future(proc.wait())
        stop = asyncio.ensure_future(self._stop_event.wait())  # type: ignore[union-attr]
        self._restart_asked = asyncio.get_running_loop().create_future()
        try:
            outcome = await self._start_phase(proc, required, exited, stop)
            if outcome == "ready":
                outcome = await self._watch_phase(exited, stop, self._restart_asked)
            return await self._end_generation(proc, generation, outcome, exited)
        finally:
            for task in (exited, stop, self._restart_asked):
                task.cancel()

    async def _start_phase(
        self, proc: ComfyProcess, required: tuple[str, ...], exited: asyncio.Future[Any], stop: asyncio.Future[Any]
    ) -> str:
        """Wait for readiness, racing the process's exit, its being stopped, a stop request and the start timeout."""
        ready = asyncio.ensure_future(self._become_ready(required))
        frozen = asyncio.ensure_future(self._watch_frozen(proc))
        try:
            done, _ = await asyncio.wait(
                {ready, frozen, exited, stop}, timeout=self.settings.start_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            ready.cancel()
            frozen.cancel()
        if stop in done:
            return "stop"
        if exited in done:
            return "exited during start-up"
        if frozen in done:
            return "killed as hung"
        if ready in done and ready.exception() is None:
            return "ready"
        if ready in done:
            log.error("readiness check failed: %s", ready.exception())
            return f"readiness check failed: {ready.exception()}"
        return f"did not become ready within {self.settings.start_timeout_s:g} s"

    async def _watch_phase(
        self, exited: asyncio.Future[Any], stop: asyncio.Future[Any], restart: asyncio.Future[str]
    ) -> str:
        hung = asyncio.ensure_future(self._watch_health())
        try:
            done, _ = await asyncio.wait({hung, exited, stop, restart}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hung.cancel()
        if stop in done:
            return "stop"
        if exited in done:
            return "exited"
        if restart in done:
            return f"{RESTARTED}: {restart.result()}"
        return "killed as hung"

    async def _end_generation(
        self, proc: ComfyProcess, generation: int, outcome: str, exited: asyncio.Future[Any]
    ) -> CrashInfo | None:
        """Make sure nothing of the tree survives, record why it ended, and say whether it was a failure."""
        s = self.settings
        if outcome == "stop":
            status = await proc.stop(s.stop_timeout_s)
            self._record_exit(self._crash_info(generation, proc, status, "stopped"))
            return None
        if outcome == "killed as hung":
            self._set_state(State.RESTARTING, f"ComfyUI (pid {proc.pid}) did not answer {s.health_failures} "
                            "health probes in a row; killing its process tree")
        elif outcome.startswith(RESTARTED):
            self._set_state(State.RESTARTING, f"ComfyUI (pid {proc.pid}) is restarted: {outcome.split(': ', 1)[1]}")
            log.warning("%s (pid %d) is restarted: %s", self._who, proc.pid, outcome.split(": ", 1)[1])
        else:
            self._set_state(State.RESTARTING, f"ComfyUI (pid {proc.pid}) {outcome}")
        status = await proc.kill(min(s.stop_timeout_s, 3.0))  # also reaps descendants of an exited process
        info = self._crash_info(generation, proc, status, outcome)
        self._record_exit(info)
        return info

    def _crash_info(self, generation: int, proc: ComfyProcess, status: ExitStatus, reason: str) -> CrashInfo:
        return CrashInfo(generation, proc.pid, status.exit_code, status.signal, reason,
                         tuple(self._ring.explanatory_tail(20)))

    def _after_failure(self, info: CrashInfo) -> float | None:
        """Record a failure; the delay before the next start, or None when the crash loop breaker trips."""
        s = self.settings
        now = time.monotonic()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > s.crash_loop_window_s:
            self._failures.popleft()
        count = len(self._failures)
        what = f"{info.describe()} ({info.reason})"
        if count >= s.crash_loop_max:
            times = "time" if count == 1 else "times"
            self._fail(f"ComfyUI failed {count} {times} within {s.crash_loop_window_s:g} s; giving up. Last: {what}")
            return None
        delay = 0.0 if count == 1 else min(s.restart_backoff_s * 2 ** (count - 2), s.restart_backoff_max_s)
        message = f"{what}; restarting in {delay:g} s (failure {count} of {s.crash_loop_max})"
        log.warning("%s%s", "" if s.instances == 1 else f"instance {self.instance}: ", message)
        self._set_state(State.RESTARTING, message)
        return delay

    def _fail(self, reason: str, *, with_log: bool = True) -> None:
        tail = self._ring.explanatory_tail(15) if with_log else []
        detail = ("\nLast ComfyUI output:\n  " + "\n  ".join(tail)) if tail else ""
        self._set_state(State.FAILED, reason + detail)

    async def _become_ready(self, required: tuple[str, ...]) -> None:
        await self._until_http_ready()
        missing = await self._missing_classes(required)
        warmup_error = None
        if self.settings.warmup_workflow is not None:
            try:
                await run_warmup(self._http, self.base_url, self.settings.warmup_workflow, self.settings.start_timeout_s)
            except WarmupError as exc:
                warmup_error = str(exc)
        with self._lock:
            self._missing = missing
            failures = list(self._import_failures)
            spawned = self._spawned_at
        if spawned is not None:
            self.metrics.comfyui_started(time.monotonic() - spawned, self.instance)
        if missing or warmup_error:
            parts = []
            if missing:
                parts.append("missing node classes: " + ", ".join(missing))
                parts.extend(failures)
            if warmup_error:
                parts.append(f"warm-up failed: {warmup_error}")
            self._set_state(State.DEGRADED, "; ".join(parts))
        else:
            self._set_state(State.READY, f"serving on {self.base_url} (pid {self._pid})")

    async def _until_http_ready(self) -> None:
        url = f"{self.base_url}/system_stats"
        probe_timeout = aiohttp.ClientTimeout(total=max(self.settings.health_timeout_s, 1.0))
        while True:
            try:
                async with self._http.get(url, timeout=probe_timeout) as resp:
                    if resp.status == 200:
                        self._record_devices(await resp.read())
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(self.settings.ready_poll_s)

    async def _missing_classes(self, required: tuple[str, ...]) -> tuple[str, ...]:
        """Ask ComfyUI about each required class alone (~1 ms each), never for the whole 0.5 MB catalogue."""

        async def registered(cls: str) -> bool:
            async with self._http.get(f"{self.base_url}/object_info/{cls}") as resp:
                body = await resp.json(content_type=None)
                return resp.status == 200 and isinstance(body, dict) and cls in body

        found = await asyncio.gather(*(registered(c) for c in required))
        return tuple(c for c, ok in zip(required, found) if not ok)

    async def _watch_frozen(self, proc: ComfyProcess) -> None:
        """Return once the process has been stopped (SIGSTOP, a frozen cgroup) for HEALTH_FAILURES checks in a row.

        Before ComfyUI serves, the health probe cannot tell "still loading" from "stopped"; without this check a
        stopped start-up would only end at COMFYUI_START_TIMEOUT_S (300 s by default).
        """
        s = self.settings
        seen = 0
        while seen < s.health_failures:
            await asyncio.sleep(s.health_interval_s)
            seen = seen + 1 if proc.is_stopped() else 0

    async def _watch_health(self) -> None:
        """Return once HEALTH_FAILURES probes in a row have failed (the process is hung)."""
        s = self.settings
        url = f"{self.base_url}/system_stats"
        probe_timeout = aiohttp.ClientTimeout(total=s.health_timeout_s)
        failures = 0
        while failures < s.health_failures:
            await asyncio.sleep(s.health_interval_s)
            try:
                async with self._http.get(url, timeout=probe_timeout) as resp:
                    body = await resp.read()
                    ok = resp.status == 200
                if ok:
                    self._record_devices(body)
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            failures = 0 if ok else failures + 1
            if not ok:
                log.warning("%s health probe failed (%d of %d)", self._who, failures, s.health_failures)

    def _record_devices(self, body: bytes) -> None:
        """GPU memory for the metrics, from the /system_stats answer the probe already has (no extra request)."""
        try:
            devices = json.loads(body).get("devices")
        except (ValueError, AttributeError):
            return
        if isinstance(devices, list):
            self.metrics.devices((d for d in devices if isinstance(d, dict)), self.instance)

    def _on_line(self, stream: str, line: str) -> None:
        self._ring.append(line)
        if any(marker in line for marker in IMPORT_FAILURE_MARKERS):
            with self._lock:
                self._import_failures.append(line.strip())
        comfy_log.info("%s %s", self._line_prefix, line)

    def _stopping(self) -> bool:
        return self._stop_event is not None and self._stop_event.is_set()

    async def _sleep_unless_stopped(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._stop_event.wait(), delay)  # type: ignore[union-attr]
        except TimeoutError:
            pass


def restart_reason(last_exit: CrashInfo | None) -> str:
    """The ``reason`` label of a restart: why the previous process ended, from a small fixed set."""
    reason = last_exit.reason if last_exit is not None else ""
    if reason == "killed as hung":
        return "hung"
    if reason == "exited during start-up":
        return "exited_starting"
    if reason.startswith("did not become ready"):
        return "start_timeout"
    if reason.startswith("readiness check failed"):
        return "readiness_failed"
    if reason.startswith("could not be started"):
        return "spawn_failed"
    if reason.startswith(RESTARTED):
        return "stuck_prompt"
    return "exited"


class StateFileWriter:
    """``STATE_FILE``: lets a HEALTHCHECK read the state in either worker mode; written off the caller's thread,
    in order, atomically, with the worker's pid (so a file left by an earlier run is recognised)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="state-file")

    def write(self, body: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        """Write ``body``; a callable is called at writing time, so when several threads report changes, the
        last write holds the state after the last change whatever order they came in."""
        if self.path is None:
            return
        try:
            self._executor.submit(self._write_now, self.path, body)
        except RuntimeError:  # executor shut down at exit
            self._write_now(self.path, body)

    @staticmethod
    def _write_now(path: Path, body: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        content = body() if callable(body) else body
        _atomic_write_json(path, {**content, "worker_pid": os.getpid(), "updated_at": time.time()})

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any) -> None:
    def setter() -> None:
        if not fut.done():
            fut.set_result(value)

    try:
        loop.call_soon_threadsafe(setter)
    except RuntimeError:  # that loop is closed: nobody is waiting any more
        pass


def _reject(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], exc: BaseException) -> None:
    def setter() -> None:
        if not fut.done():
            fut.set_exception(exc)

    try:
        loop.call_soon_threadsafe(setter)
    except RuntimeError:
        pass


def _atomic_write_json(path: Path, body: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1), encoding="utf-8")
    os.replace(tmp, path)
