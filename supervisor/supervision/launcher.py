"""How ComfyUI is started: exec'd afresh (``COMFYUI_LAUNCH=exec``) or forked from a pre-imported parent (``fork``).

A cold ComfyUI spends almost all of its start importing torch, torchvision, scipy, transformers and the rest. In
``fork`` mode a long-lived parent, the "zygote" (zygote.py, run in ComfyUI's interpreter), has imported those
third-party modules once and forks a child per start that runs ComfyUI's ``main.py`` with the same argv, cwd and
environment exec would use. To the supervisor the child *is* the ComfyUI process: its pid, its session and
process group, its tree marker, its output pipes, its exit status (reported by the zygote, which reaps it). The
zygote lives across generations; if it dies, the running ComfyUI is killed with it and both are started again,
so its death is handled like a ComfyUI crash. It ends when the supervisor closes its control socket.

The module list is not hand-written: the first child of a parent that has nothing to preload records the
third-party modules ComfyUI imported (everything not under ``COMFYUI_DIR``) into ``DATA_DIR/launcher/``, under a
name that changes with the interpreter and its site-packages, and the parent imports them while it is idle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from supervisor.supervision.process import ComfyProcess, LineProtocol, LineSink, comfy_env

log = logging.getLogger("supervisor.launcher")

ZYGOTE_SCRIPT = Path(__file__).with_name("zygote.py")
NO_CUDA_MALLOC = "--disable-cuda-malloc"  # the parent took ComfyUI's cuda_malloc decision before importing torch
# room in the parent's argv, which each child overwrites with ComfyUI's command line (/proc/PID/cmdline, ps)
CMDLINE_ROOM = " " * 8192
EXIT_STATUS_WAIT_S = 0.5  # after the child's pidfd fires: how long to wait for the parent's report of its status


class LaunchError(RuntimeError):
    """The zygote could not be started or did not answer a fork request."""


class ForkLauncher:
    """The supervisor's side of one zygote: start it, ask it for a ComfyUI, hear about exits, stop it.

    Every method runs on the supervisor's loop. One launcher per supervisor (per ComfyUI instance)."""

    def __init__(self, python: str, comfyui_dir: Path, data_dir: Path, comfy_args: Sequence[str],
                 env: Mapping[str, str], gc_freeze: bool = True, diagnostics: Mapping[str, Any] | None = None) -> None:
        """``diagnostics``: extra zygote settings for tests (``trace_cuda``: a file for the CUDA call trace,
        ``cuda_guard``: False to let CUDA calls through so the trace can show them)."""
        self._python = python
        self._comfyui_dir = comfyui_dir
        self._modules_dir = data_dir / "launcher"
        self._comfy_args = list(comfy_args)
        self._env = dict(env)
        self._gc_freeze = gc_freeze
        self._diagnostics = dict(diagnostics or {})
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._children: dict[int, _Child] = {}
        self._gone: asyncio.Future[None] | None = None
        self.forks = 0  # children forked so far: a parent that never forked one may not work here at all
        self.busy = False  # the parent is importing: it reaps (and reports) its children only afterwards
        self.marker = ""  # the parent's tree marker: what /proc shows in every child's environ (leftover.py)
        self.preloaded: dict[str, Any] | None = None  # the parent's report once it has imported the module list

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self._gone is not None \
            and not self._gone.done()

    async def start(self) -> None:
        """Start the parent in its own session; it preloads in the background (fork requests wait for it)."""
        self._modules_dir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.marker = uuid.uuid4().hex
        config = {"control_fd": theirs.fileno(), "comfyui_dir": str(self._comfyui_dir),
                  "modules_dir": str(self._modules_dir), "comfy_args": self._comfy_args, "gc_freeze": self._gc_freeze, **self._diagnostics}
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self._python, str(ZYGOTE_SCRIPT), json.dumps(config), CMDLINE_ROOM, pass_fds=(theirs.fileno(),),
                env=comfy_env(self._env, self.marker), cwd=str(self._comfyui_dir),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise LaunchError(f"the launcher's parent could not be started with {self._python}: {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock, self._buffer = ours, b""
        self._gone = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)
        asyncio.ensure_future(self._forward_output(self._proc))
        log.info("started the launcher's parent (pid %d) for fork mode", self._proc.pid)

    async def fork(self, argv: Sequence[str], *, cwd: str, env: Mapping[str, str], marker: str, sink: LineSink,
                   timeout: float) -> ComfyProcess:
        """One ComfyUI: ``argv`` is what exec would run (``python main.py ARGS``). Raises LaunchError."""
        if not self.alive:
            await self.start()
        assert self._sock is not None and self._gone is not None
        loop = asyncio.get_running_loop()
        args = [*argv[2:]] + ([] if NO_CUDA_MALLOC in argv else [NO_CUDA_MALLOC])
        request = {"op": "fork", "python": argv[0], "main": argv[1], "argv": args, "cwd": cwd, "env": comfy_env(env, marker)}
        exited: asyncio.Future[None] = loop.create_future()
        child = _Child(exited, lambda: self.busy and self.alive)
        pipes = [os.pipe(), os.pipe()]
        try:
            socket.send_fds(self._sock, [(json.dumps(request) + "\n").encode()], [pipes[0][1], pipes[1][1]])
        except OSError as exc:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise LaunchError(f"the launcher's parent did not take the request: {exc}") from exc
        for _, w in pipes:
            os.close(w)
        reply = await self._reply(timeout)
        if reply.get("op") != "forked":
            for r, _ in pipes:
                os.close(r)
            raise LaunchError(f"the launcher's parent refused to fork: {reply.get('message', reply)}")
        pid = int(reply["pid"])
        self.forks += 1
        self._children[pid] = child
        protocol = LineProtocol(sink, loop.create_future())
        for fd, (r, _) in ((1, pipes[0]), (2, pipes[1])):
            transport, _ = await loop.connect_read_pipe(lambda fd=fd: _PipeReader(protocol, fd),
                                                        os.fdopen(r, "rb", buffering=0))
            child.transports.append(transport)
        child.watch(pid, loop)
        return ComfyProcess(pid, exited, marker, lambda: child.returncode, child.close, environ_marker=self.marker)

    async def _reply(self, timeout: float) -> dict[str, Any]:
        assert self._gone is not None
        get = asyncio.ensure_future(self._replies.get())
        done, _ = await asyncio.wait({get, self._gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        why = "died" if self._gone.done() else f"did not answer within {timeout:g} s"
        raise LaunchError(f"the launcher's parent (pid {self.pid}) {why}")

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._on_parent_gone()
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._on_message(json.loads(line))

    def _on_message(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "exit":
            child = self._children.pop(int(message["pid"]), None)
            if child is not None:
                child.set_status(int(message["status"]))
        elif op == "preloading":
            self.busy = True
        elif op == "preloaded":
            self.busy = False
            self.preloaded = message
            log.info("the launcher's parent has imported %d modules in %.2f s (%d left to the child%s)",
                     message.get("modules", 0), message.get("seconds", 0.0), len(message.get("failed", [])),
                     f"; CUDA calls refused: {', '.join(message['cuda_refused'])}" if message.get("cuda_refused")
                     else "")
        elif op == "warning":
            log.warning("launcher's parent: %s", message.get("message"))
        else:
            self._replies.put_nowait(message)

    def _on_parent_gone(self) -> None:
        """The parent died (or closed the socket): its ComfyUI goes with it, and both start again."""
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        self.busy = False
        for pid in list(self._children):
            log.warning("the launcher's parent (pid %s) is gone; killing ComfyUI (pid %d) so both start again",
                        self.pid, pid)
            _kill_group(pid)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the parent: end of file on its socket, then SIGKILL if it lingers. Its children are not touched."""
        proc = self._proc
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)  # asked for: not a death to report
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.warning("the launcher's parent (pid %d) did not exit on end of file; killing it", proc.pid)
            proc.kill()
            await proc.wait()

    async def _forward_output(self, proc: asyncio.subprocess.Process) -> None:
        """The parent's own output (a traceback if it fails) goes to the worker's log."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            log.info("[launcher] %s", raw.decode("utf-8", "replace").rstrip())
        code = await proc.wait()
        if code != 0 or (self._gone is not None and not self._gone.done()):
            log.warning("the launcher's parent (pid %d) exited with %s", proc.pid, code)
        if self._proc is proc and self._sock is not None:
            self._on_parent_gone()


class _Child:
    """One forked ComfyUI as the supervisor sees it: exit noticed through its pidfd (or the parent's report),
    status from the parent (which reaps it)."""

    def __init__(self, exited: asyncio.Future[None], parent_busy: Callable[[], bool]) -> None:
        self.exited = exited
        self._parent_busy = parent_busy
        self.returncode: int | None = None
        self.transports: list[asyncio.BaseTransport] = []
        self._pidfd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, pid: int, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone and reaped: the parent's report carries the status
            return
        loop.add_reader(self._pidfd, self._on_pidfd)

    def _on_pidfd(self) -> None:
        self._stop_watching()
        if self.returncode is None and self._loop is not None:
            # it has ended; its status comes from the parent a moment later, unless the parent is gone too
            self._loop.call_later(EXIT_STATUS_WAIT_S, self._resolve_unless_parent_busy)

    def _resolve_unless_parent_busy(self) -> None:
        if self._parent_busy() and self._loop is not None:
            self._loop.call_later(EXIT_STATUS_WAIT_S, self._resolve_unless_parent_busy)
        else:
            self._resolve()

    def set_status(self, code: int) -> None:
        self.returncode = code
        self._resolve()

    def _resolve(self) -> None:
        self._stop_watching()
        if not self.exited.done():
            self.exited.set_result(None)

    def _stop_watching(self) -> None:
        if self._pidfd is not None and self._loop is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def close(self) -> None:
        self._stop_watching()
        for transport in self.transports:
            transport.close()


class _PipeReader(asyncio.Protocol):
    """One of the child's output pipes, fed into the same line splitter exec mode uses."""

    def __init__(self, lines: LineProtocol, fd: int) -> None:
        self._lines = lines
        self._fd = fd

    def data_received(self, data: bytes) -> None:
        self._lines.pipe_data_received(self._fd, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lines.pipe_connection_lost(self._fd, exc)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
