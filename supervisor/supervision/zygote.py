"""The launcher's parent process ("zygote"): import ComfyUI's third-party modules once, then fork a ComfyUI per start.

Run by the supervisor as ``COMFYUI_PYTHON zygote.py CONFIG_JSON`` (launcher.py), in ComfyUI's interpreter, so it
uses the standard library only and never imports the ``supervisor`` package. It imports no module of ComfyUI
itself: ``comfy.cli_args`` parses ``sys.argv`` at import and ``comfy/ops.py`` calls ``torch.cuda.is_available()``
at import; both belong to the child.

GPU safety (docs/architecture.md, "The launcher"): a forked child can use CUDA only if its parent never
initialised it. So the parent

- applies ComfyUI's ``cuda_malloc`` decision before ``import torch`` (the allocator backend is read from the
  environment by torch) and the child runs with ``--disable-cuda-malloc``;
- guards every ``torch.cuda`` function and ``torch._C._cuda_*`` binding while it preloads: a module whose import
  calls one is refused (left for the child to import) instead of reaching the driver;
- runs no torch computation (OpenMP's thread pool is not fork-safe once started).

Protocol on the control socket (one JSON object per line; fds ride along with SCM_RIGHTS):

- request ``{"op": "fork", "main": path, "argv": [...], "cwd": dir, "env": {...}}`` with fds (stdout, stderr);
  answer ``{"op": "forked", "pid": n}`` or ``{"op": "error", "message": ...}``;
- unsolicited ``{"op": "exit", "pid": n, "status": waitpid status}`` when a child ends, and
  ``{"op": "preloaded", ...}`` once the module list is imported.

End of file on the socket (the supervisor closed it or died) ends the zygote; its children are left to the
supervisor's tree rules (the child is ComfyUI, in its own session).
"""

from __future__ import annotations

import ast
import errno
import gc
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # our own folder must not shadow a third-party module (``process``, ``ports``, ...)

PARENT_PID = os.getpid()
# torch.cuda functions that never reach the driver: everything else is refused in the parent.
CUDA_SAFE = frozenset({"is_initialized", "_is_in_bad_fork", "_is_compiled", "_lazy_call"})
STABLE_AFTER_S = 1.0  # the child records its modules once their count has not grown for this long
LIST_POLL_S = 1.0  # how often the idle parent looks for a longer module list


class CudaInParent(RuntimeError):
    """Raised in the parent by a guarded CUDA call: the module that made it is left to the child."""


# ----------------------------------------------------------------------------------------------------------
# The module list: recorded by a child from a real boot, preloaded by the parent
# ----------------------------------------------------------------------------------------------------------


def _under(path: str | None, roots: tuple[str, ...]) -> bool:
    return bool(path) and os.path.realpath(path).startswith(roots)


def third_party_modules(comfyui_dir: str) -> list[str]:
    """The loaded modules that are not ComfyUI's own (nothing from under COMFYUI_DIR), in import order."""
    root = (os.path.realpath(comfyui_dir) + os.sep,)
    names = []
    for name, module in list(sys.modules.items()):
        if name == "__main__" or module is None:
            continue
        spec = getattr(module, "__spec__", None)
        if spec is None:  # made by hand (runpy, importlib.util.module_from_spec): cannot be imported by name
            continue
        locations = [getattr(module, "__file__", None), *list(getattr(module, "__path__", None) or [])]
        if any(_under(p, root) for p in locations if isinstance(p, str)):
            continue
        names.append(name)
    return names


def record_modules_when_stable(path: str, comfyui_dir: str) -> None:
    """In the child: whenever ComfyUI's imports have settled at a new high (start-up, then a first prompt's lazy
    imports), write the third-party module list for the parent, which imports what it does not have yet."""

    def run() -> None:
        last, since, written = -1, time.monotonic(), 0
        while True:
            time.sleep(0.25)
            count = len(sys.modules)
            if count != last:
                last, since = count, time.monotonic()
            elif count > written and time.monotonic() - since >= STABLE_AFTER_S:
                written = count
                _write_list(path, third_party_modules(comfyui_dir))

    threading.Thread(target=run, name="zygote-record-modules", daemon=True).start()


def _write_list(path: str, modules: list[str]) -> None:
    known = read_module_list(path)
    merged = known + [m for m in modules if m not in set(known)]  # never shrinks: a lazy import stays known
    if len(merged) == len(known):
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"modules": merged}, fh)
        os.replace(tmp, path)
    except OSError:
        pass


def environment_key(comfyui_dir: str) -> str:
    """Names the module list: a new interpreter, venv or installed package (site-packages changes) gets a new one."""
    import hashlib
    import site

    parts = [os.path.realpath(sys.executable), sys.version, sys.prefix, os.path.realpath(comfyui_dir)]
    for folder in sorted(set(site.getsitepackages() + [site.getusersitepackages()])):
        try:
            parts.append(f"{folder}:{os.stat(folder).st_mtime_ns}")
        except OSError:
            continue
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read_module_list(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return []
    modules = data.get("modules") if isinstance(data, dict) else None
    return [m for m in modules if isinstance(m, str)] if isinstance(modules, list) else []


# ----------------------------------------------------------------------------------------------------------
# CUDA: the allocator decision before torch, the guard while preloading
# ----------------------------------------------------------------------------------------------------------


def cuda_malloc_env(comfyui_dir: str, comfy_args: list[str]) -> dict[str, str]:
    """ComfyUI's ``cuda_malloc.py`` decision, taken without importing it (it imports ``comfy.cli_args``).

    Same rule: ``--cuda-malloc``, or by default a CUDA build of torch >= 2 on a GPU not on its blacklist (read
    from ComfyUI's own file), unless ``--disable-cuda-malloc``. Returns the variables to set before torch.
    """
    if "--disable-cuda-malloc" in comfy_args:
        return {}
    wanted = "--cuda-malloc" in comfy_args or _default_cuda_malloc(comfyui_dir)
    if not wanted:
        return {}
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    value = "backend:cudaMallocAsync" if conf is None else conf + ",backend:cudaMallocAsync"
    return {"PYTORCH_CUDA_ALLOC_CONF": value, "MIMALLOC_PURGE_DELAY": "0"}


def _default_cuda_malloc(comfyui_dir: str) -> bool:
    version = _torch_version()
    if not (version[:1].isdigit() and int(version[0]) >= 2 and "+cu" in version):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10, check=True).stdout
        names = {line.decode("utf-8", "replace").split(" (UUID")[0] for line in out.split(b"\n") if line}
    except (OSError, subprocess.SubprocessError):
        names = set()
    blacklist = _malloc_blacklist(os.path.join(comfyui_dir, "cuda_malloc.py"))
    return not any("NVIDIA" in n and any(b in n for b in blacklist) for n in names)


def _torch_version() -> str:
    """torch's version string read from its version.py (as cuda_malloc.py does), without importing torch."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "version.py")
        if os.path.isfile(path):
            namespace: dict[str, object] = {}
            with open(path, encoding="utf-8") as fh:
                exec(compile(fh.read(), path, "exec"), namespace)  # noqa: S102 - torch's own version file
            return str(namespace.get("__version__", ""))
    return ""


def _malloc_blacklist(path: str) -> set[str]:
    """The ``blacklist`` set literal of ComfyUI's cuda_malloc.py (parsed, not imported)."""
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError):
        return set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "blacklist" for t in node.targets):
            try:
                return set(ast.literal_eval(node.value))
            except ValueError:
                return set()
    return set()


class CudaGuard:
    """Wraps torch.cuda's functions and torch._C's ``_cuda_*`` bindings: in the parent a call raises
    :class:`CudaInParent` (and is recorded); in a child it goes straight through. Removed in the child."""

    def __init__(self) -> None:
        self.refused: list[str] = []
        self.installed = False
        self._originals: list[tuple[object, str, object]] = []

    def install(self, torch: object) -> None:
        self.installed = True
        cuda, c = torch.cuda, torch._C  # type: ignore[attr-defined]
        for name in dir(cuda):
            fn = getattr(cuda, name, None)
            if name not in CUDA_SAFE and callable(fn) and not isinstance(fn, type) and \
                    getattr(fn, "__module__", "").startswith("torch.cuda"):
                self._wrap(cuda, name, fn, f"torch.cuda.{name}")
        for name in dir(c):
            if name.startswith("_cuda_") and callable(getattr(c, name)):
                self._wrap(c, name, getattr(c, name), f"torch._C.{name}")

    def _wrap(self, owner: object, name: str, fn: object, label: str) -> None:
        refused = self.refused

        def guarded(*args: object, **kwargs: object) -> object:
            if os.getpid() == PARENT_PID:
                refused.append(label)
                raise CudaInParent(f"{label} called in the launcher's parent")
            return fn(*args, **kwargs)  # type: ignore[operator]

        guarded.__wrapped__ = fn  # type: ignore[attr-defined]
        self._originals.append((owner, name, fn))
        setattr(owner, name, guarded)

    def remove(self) -> None:
        for owner, name, fn in self._originals:
            setattr(owner, name, fn)
        self._originals.clear()


class CudaTracer:
    """Diagnostics (the CUDA-safety test): records every call into torch.cuda's code or a ``torch._C._cuda_*``
    binding made in this process, on any thread, independently of :class:`CudaGuard`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: list[str] = []
        sys.setprofile(self._profile)
        threading.setprofile(self._profile)

    def _profile(self, frame: object, event: str, arg: object) -> None:
        if os.getpid() != PARENT_PID:
            return
        if event == "call":
            code = frame.f_code  # type: ignore[attr-defined]
            # functions only: a module's or a class's body running at import calls nothing by itself
            if code.co_flags & 0x1 and f"{os.sep}torch{os.sep}cuda{os.sep}" in code.co_filename:
                self.calls.append(f"torch.cuda:{code.co_name}")
        elif event == "c_call" and getattr(arg, "__name__", "").startswith("_cuda_"):
            owner = getattr(arg, "__module__", None) or type(getattr(arg, "__self__", None)).__name__
            self.calls.append(f"{owner}.{arg.__name__}")  # type: ignore[attr-defined]

    def save(self) -> None:
        with open(self.path, "w", encoding="utf-8") as fh:
            json.dump({"calls": self.calls}, fh)


def preload(names: list[str], guard: CudaGuard | None) -> tuple[int, list[str]]:
    """Import ``names`` in order (torch first, guarded at once); returns how many are loaded and what failed."""
    failed: list[str] = []
    if "torch" in names:
        try:
            importlib.import_module("torch")
        except Exception:  # noqa: BLE001 - a torch that cannot import is the child's to report
            failed.append("torch")
    for name in names:
        if guard is not None and not guard.installed and "torch" in sys.modules:
            guard.install(sys.modules["torch"])
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any failure (CudaInParent included) leaves the module to the child
            failed.append(name)
    return sum(1 for n in names if n in sys.modules), failed


# ----------------------------------------------------------------------------------------------------------
# The child
# ----------------------------------------------------------------------------------------------------------


def become_comfyui(request: dict, fds: list[int], guard: CudaGuard, extra_env: dict[str, str],
                   record_to: str | None, comfyui_dir: str) -> None:
    """In the freshly forked child: become the process ``python main.py ARGV`` would be, then run it. Never returns."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        _close_inherited()
        os.environ.clear()
        os.environ.update(request["env"])  # CUDA_VISIBLE_DEVICES and the instance's settings before any CUDA use
        os.environ.update(extra_env)
        guard.remove()
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
        _reseed()
        logging = sys.modules.get("logging")
        if logging is not None:  # a preloaded library may have configured the root logger: ComfyUI does its own
            logging.root.handlers.clear()
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True, write_through=True)  # as PYTHONUNBUFFERED=1 does
        os.chdir(request["cwd"])
        show_command_line([request.get("python", sys.executable), request["main"], *request["argv"]])
        main = request["main"]
        sys.argv = [main, *request["argv"]]
        sys.path[0:0] = [os.path.dirname(os.path.abspath(main))]
        if record_to:
            record_modules_when_stable(record_to, comfyui_dir)
        import runpy

        runpy.run_path(main, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - what an interpreter would print before exiting 1
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        # never run the parent's exit handlers (torch's would delete the parent's temporary files)
        os._exit(code)


def show_command_line(argv: list[str]) -> None:
    """Make ``/proc/PID/cmdline`` (``ps``, psutil) show ComfyUI's command line instead of the parent's: written
    over the parent's argv strings (the launcher pads them to make room), found through /proc/self/stat."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49 of proc(5))
        data = b"\0".join(a.encode("utf-8", "surrogateescape") for a in argv) + b"\0"
        if len(data) > end - start:
            return  # no room: the parent's command line stays
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(data + b"\0" * (end - start - len(data)))
    except (OSError, ValueError, IndexError):
        pass


def _close_inherited() -> None:
    """Close every fd but 0-2: the parent's sockets, pipes and files are not ComfyUI's."""
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        fd = int(name)
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass
    if not os.path.isdir("/proc/self/fd"):
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))


def _reseed() -> None:
    """A fresh seed for every generator a preloaded module created (``random`` reseeds itself at fork)."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(None)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "default_generator"):
        torch.default_generator.seed()  # the CPU generator only: CUDA's are created fresh when the child uses CUDA


# ----------------------------------------------------------------------------------------------------------
# The parent's loop
# ----------------------------------------------------------------------------------------------------------


class Zygote:
    def __init__(self, config: dict) -> None:
        self.sock = socket.socket(fileno=config["control_fd"])
        self.comfyui_dir = config["comfyui_dir"]
        self.modules_file = config.get("modules_file") or os.path.join(
            config["modules_dir"], f"modules-{environment_key(self.comfyui_dir)}.json")
        self.guarded = bool(config.get("cuda_guard", True))
        self.tracer = CudaTracer(config["trace_cuda"]) if config.get("trace_cuda") else None
        self.gc_freeze = bool(config.get("gc_freeze", True))
        self.guard = CudaGuard()
        self.extra_env = cuda_malloc_env(self.comfyui_dir, list(config.get("comfy_args", [])))
        os.environ.update(self.extra_env)
        self.preloaded = False
        self.list_stamp: int | None = None
        self.failed: set[str] = set()
        self.buffer = b""
        self.children: set[int] = set()
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        self.sending = False
        # a child's end is reported from the handler, so also while the parent is busy importing (Python runs it
        # between two bytecodes); a send it would interrupt is finished first and the loop reports it then
        signal.signal(signal.SIGCHLD, lambda *_: None if self.sending else self.reap())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the group's SIGINT is ComfyUI's, never ours
        self.wake_w = wake_w

    def send(self, message: dict, fds: list[int] | None = None) -> None:
        data = (json.dumps(message) + "\n").encode()
        was, self.sending = self.sending, True
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)
        finally:
            self.sending = was

    def maybe_preload(self) -> None:
        """Import what the module list names and we do not have yet (the list grows as children record it)."""
        try:
            stamp = os.stat(self.modules_file).st_mtime_ns
        except OSError:
            return
        if stamp == self.list_stamp:
            return
        self.list_stamp = stamp
        names = [n for n in read_module_list(self.modules_file) if n not in sys.modules and n not in self.failed]
        if not names:
            return
        started = time.monotonic()
        self.send({"op": "preloading", "modules": len(names)})  # exits are reported late until "preloaded"
        if self.gc_freeze:
            gc.unfreeze()
        loaded, failed = preload(names, self.guard if self.guarded else None)
        if self.tracer is not None:
            self.tracer.save()
        self.failed.update(failed)
        gc.collect()
        if self.gc_freeze:
            gc.freeze()  # a child's collector would otherwise touch (and so copy) every inherited object
        self.preloaded = True
        self.send({"op": "preloaded", "modules": loaded, "total": len(sys.modules), "failed": failed,
                   "cuda_refused": sorted(set(self.guard.refused)), "seconds": round(time.monotonic() - started, 3),
                   "threads": threading.active_count()})

    def run(self) -> None:
        self.maybe_preload()
        while True:
            ready, _, _ = select.select([self.sock, self.wake_r], [], [], LIST_POLL_S)
            if self.wake_r in ready:
                try:
                    os.read(self.wake_r, 512)
                except BlockingIOError:
                    pass
            self.reap()
            if self.sock in ready and not self.receive():
                return
            self.maybe_preload()

    def receive(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 4)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN):
                return True
            return False
        if not data:
            return False
        self.buffer += data
        pending = list(fds)
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            request = json.loads(line)
            if request.get("op") == "fork":
                mine, pending = pending[:2], pending[2:]
                self.fork(request, mine)
        return True

    def fork(self, request: dict, fds: list[int]) -> None:
        if len(fds) != 2:
            self.send({"op": "error", "message": f"a fork request needs 2 fds (stdout, stderr), got {len(fds)}"})
            return
        record_to = self.modules_file
        if threading.active_count() > 1:
            names = ", ".join(t.name for t in threading.enumerate())
            self.send({"op": "warning", "message": f"forking with {threading.active_count()} threads: {names}"})
        pid = os.fork()
        if pid == 0:
            become_comfyui(request, fds, self.guard, self.extra_env, record_to, self.comfyui_dir)
        for fd in fds:
            os.close(fd)
        self.children.add(pid)
        self.send({"op": "forked", "pid": pid})

    def reap(self) -> None:
        if not self.children:
            return
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self.children.discard(pid)
                continue
            if done:
                self.children.discard(pid)
                self.send({"op": "exit", "pid": pid, "status": os.waitstatus_to_exitcode(status)})


def main() -> None:
    config = json.loads(sys.argv[1])
    zygote = Zygote(config)
    try:
        zygote.run()
    except (BrokenPipeError, ConnectionResetError):
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
