"""One ComfyUI process and its whole tree: spawn it, read its output line by line, notice its exit, kill it.

The child runs in its own session (so its process group holds its descendants) and carries an environment
marker (so descendants that left the group, or were re-parented to init, are still found). Exit is
noticed through the subprocess protocol's ``process_exited`` callback: ``Process.wait()`` in Python 3.11
also waits for the stdout/stderr pipes to close, which never happens while a grandchild holds them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import psutil

log = logging.getLogger("supervisor.process")

TREE_MARKER_VAR = "COMFY_WORKER_TREE"
# what ComfyUI prints for every prompt, whatever happens: never the line that explains a crash
ROUTINE_LINE = re.compile(r"\s*(got prompt|Prompt executed in [0-9.:]+( seconds)?)\s*$")

LineSink = Callable[[str, str], None]  # (stream name, line without newline)


@dataclass(frozen=True)
class ExitStatus:
    """How the process ended: a code for a normal exit, a signal number for a kill."""

    exit_code: int | None
    signal: int | None

    @classmethod
    def from_returncode(cls, code: int) -> "ExitStatus":
        return cls(None, -code) if code < 0 else cls(code, None)


def restore_default_sigint() -> None:
    """ComfyUI is stopped with SIGINT, and an ignored SIGINT survives exec: a worker, benchmark or test session
    started in the background of a non-interactive shell inherits SIGINT ignored, and would pass that on to every
    ComfyUI it starts (each stop then waits for its SIGTERM escalation). Call it from the main thread, first."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class LogRing:
    """The last N lines ComfyUI printed, shared by both streams, safe to read from any thread."""

    def __init__(self, size: int) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=size)

    def append(self, line: str) -> None:
        self._lines.append(line)  # deque.append is atomic under the GIL

    def tail(self, n: int) -> list[str]:
        lines = list(self._lines)
        return lines[-n:] if n > 0 else []

    def explanatory_tail(self, n: int) -> list[str]:
        """The last ``n`` lines that can explain a failure: ComfyUI's routine lines (``got prompt``, ``Prompt
        executed in 0.01 seconds``) repeat once per job and would push the traceback out of a crash message."""
        lines = [line for line in self._lines if not ROUTINE_LINE.match(line)]
        return lines[-n:] if n > 0 else []


class LineProtocol(asyncio.SubprocessProtocol):
    """Splits both pipes into lines and resolves ``exited`` the moment the child is reaped."""

    def __init__(self, sink: LineSink, exited: asyncio.Future[None]) -> None:
        self._sink = sink
        self._exited = exited
        self._partial: dict[int, bytes] = {1: b"", 2: b""}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buf = self._partial.get(fd, b"") + data
        *lines, rest = buf.split(b"\n")
        self._partial[fd] = rest
        for raw in lines:
            self._emit(fd, raw)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        rest = self._partial.pop(fd, b"")
        if rest:
            self._emit(fd, rest)

    def process_exited(self) -> None:
        if not self._exited.done():
            self._exited.set_result(None)

    def _emit(self, fd: int, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self._sink("stdout" if fd == 1 else "stderr", line)


class ComfyProcess:
    """A running ComfyUI child. Create with :meth:`spawn`; every method runs on the supervisor's loop."""

    def __init__(self, pid: int, exited: asyncio.Future[None], marker: str, returncode: Callable[[], int | None],
                 close: Callable[[], None], environ_marker: str | None = None) -> None:
        """``exited`` resolves when the process has ended; ``returncode`` is then its code (negative: a signal).
        Started by :meth:`spawn` (exec) or by the launcher's parent (fork, launcher.py). ``environ_marker`` is the
        marker other processes read in its ``/proc/PID/environ``: a forked child shows its parent's there."""
        self._exited = exited
        self._returncode = returncode
        self._close = close
        self.marker = marker
        self.environ_marker = environ_marker or marker
        self.pid = pid
        self.started_at = time.monotonic()
        try:
            self._ps: psutil.Process | None = psutil.Process(self.pid)
        except psutil.Error:
            self._ps = None

    @classmethod
    async def spawn(
        cls, argv: Sequence[str], *, cwd: str, env: Mapping[str, str], marker: str, sink: LineSink
    ) -> "ComfyProcess":
        """Start ``argv`` in its own session with ``marker`` in its environment; raises OSError if exec fails."""
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        child_env = comfy_env(env, marker)
        transport, _ = await loop.subprocess_exec(
            lambda: LineProtocol(sink, exited),
            *argv,
            cwd=cwd,
            env=child_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        return cls(transport.get_pid(), exited, marker, transport.get_returncode, transport.close)

    def is_stopped(self) -> bool:
        """Whether the process is stopped (state T): it cannot make progress until someone continues it."""
        try:
            return self._ps is not None and self._ps.status() == psutil.STATUS_STOPPED
        except psutil.Error:
            return False

    @property
    def returncode(self) -> int | None:
        return self._returncode()

    async def wait(self) -> ExitStatus:
        """Resolve when the child itself has exited (descendants may live on)."""
        await asyncio.shield(self._exited)
        code = self._returncode()
        return ExitStatus.from_returncode(code if code is not None else -signal.SIGKILL)

    async def stop(self, timeout: float) -> ExitStatus:
        """Clean stop: SIGINT to the group, then SIGTERM, then SIGKILL on the whole tree, each bounded."""
        tree = await self._tree()
        _signal_group(self.pid, signal.SIGINT)
        if not await self._wait_for_exit(timeout):
            log.warning("ComfyUI (pid %s) did not stop within %.1f s of SIGINT; sending SIGTERM", self.pid, timeout)
            await self._terminate(tree | await self._tree(), timeout)
        await self._reap_leftovers(tree)
        return await self.wait()

    async def kill(self, term_timeout: float) -> ExitStatus:
        """Hung or crashed: SIGTERM the whole tree, then SIGKILL whatever survives (a stopped process does)."""
        await self._terminate(await self._tree(), term_timeout)
        return await self.wait()

    async def _terminate(self, tree: set[psutil.Process], timeout: float) -> None:
        _send(tree, signal.SIGTERM)
        _send(tree, signal.SIGCONT)  # a stopped process only acts on the pending SIGTERM once continued
        alive = await self._wait_gone(tree, timeout)
        alive |= await self._tree()
        if alive:
            _send(alive, signal.SIGKILL)
            await self._wait_gone(alive, 5.0)

    async def _wait_gone(self, procs: set[psutil.Process], timeout: float) -> set[psutil.Process]:
        """Wait for the processes to end, our own child through its exit future (never waitpid it twice)."""
        others = {p for p in procs if p.pid != self.pid}
        own_exit = self._wait_for_exit(timeout) if any(p.pid == self.pid for p in procs) else _true()
        own_gone, alive = await asyncio.gather(own_exit, asyncio.to_thread(_wait_gone, others, timeout))
        if not own_gone and self.returncode is None:
            alive = alive | {p for p in procs if p.pid == self.pid}
        return alive

    async def _reap_leftovers(self, before: set[psutil.Process]) -> None:
        """After the main process is gone, descendants get one short SIGTERM grace, then SIGKILL."""
        left = {p for p in before | await self._tree() if p.pid != self.pid and _alive(p)}
        if left:
            log.info("stopping %d leftover ComfyUI descendant(s): %s", len(left), sorted(p.pid for p in left))
            await self._terminate(left, 1.0)

    async def _wait_for_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), timeout)
            return True
        except TimeoutError:
            return False

    async def _tree(self) -> set[psutil.Process]:
        """Every live process of this tree: descendants, group members and marker holders."""
        return await asyncio.to_thread(find_tree, self._ps, self.pid, self.marker)

    def close(self) -> None:
        self._close()


def comfy_env(env: Mapping[str, str], marker: str) -> dict[str, str]:
    """The environment ComfyUI runs with, however it is launched: the worker's, its tree marker, unbuffered output."""
    return {**env, TREE_MARKER_VAR: marker, "PYTHONUNBUFFERED": "1"}


def find_tree(root: psutil.Process | None, pgid: int, marker: str) -> set[psutil.Process]:
    """Processes that belong to one ComfyUI tree, found three ways because orphans are re-parented."""
    found: set[psutil.Process] = set()
    if root is not None and _alive(root):
        found.add(root)
        try:
            found.update(root.children(recursive=True))
        except psutil.Error:
            pass
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me or proc in found:
            continue
        try:
            if os.getpgid(proc.pid) == pgid or proc.environ().get(TREE_MARKER_VAR) == marker:
                found.add(proc)
        except (psutil.Error, OSError):
            continue
    return {p for p in found if _alive(p)}


async def _true() -> bool:
    return True


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _send(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def _wait_gone(procs: set[psutil.Process], timeout: float) -> set[psutil.Process]:
    """Blocking (run in a thread): wait for the processes to end; return those still alive."""
    if not procs:
        return set()
    _, alive = psutil.wait_procs(list(procs), timeout=timeout)
    return {p for p in alive if _alive(p)}
