"""The ports the worker is about to listen on, checked before anything starts: a taken one stops start-up.

Why before: ComfyUI learns that its port is taken only after it has loaded every node, then dies, and the
supervisor's restarts bury "address already in use" under a crash loop; the API's port is bound only after
ComfyUI was spawned, so a taken API port left a half-started ComfyUI behind. Worse, whatever server already
listens on COMFYUI_PORT would answer the readiness probe in ComfyUI's place. So ``main`` asks here first and
refuses any server on either port (a ComfyUI left over by an earlier worker of ours on the same DATA_DIR was
stopped just before, :mod:`supervisor.supervision.leftover`).

A port is free when it can be bound the way aiohttp binds it (``SO_REUSEADDR``, so connections of an earlier
run still in TIME_WAIT do not count as "in use"; ``IPV6_V6ONLY`` on IPv6, like asyncio). The probe socket is
closed at once; nothing listens on it.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

import psutil

from supervisor.config import Settings


@dataclass(frozen=True)
class PortUse:
    """One address the worker will listen on, and the variable that chooses its port."""

    variable: str
    host: str
    port: int
    offset: int = 0  # ComfyUI instance i listens on COMFYUI_PORT + i

    @property
    def chosen_by(self) -> str:
        return self.variable if not self.offset else f"{self.variable}+{self.offset}, ComfyUI instance {self.offset}"


@dataclass(frozen=True)
class PortProblem:
    """A port that cannot be listened on: why, and (where the system tells) which process holds it."""

    use: PortUse
    error: OSError
    holder: str | None = None

    def describe(self) -> str:
        """One line: the port, what is wrong, what to change."""
        u = self.use
        where = f"port {u.port} on {u.host or 'all addresses'} ({u.chosen_by})"
        if self.error.errno == errno.EADDRINUSE:
            by = f" by {self.holder}" if self.holder else ""
            fix = f"set {u.variable} to a free port" if not u.offset else (
                f"set {u.variable} to a port that is free with the ports after it (one per instance)")
            return f"{where} is already in use{by}; stop that server, or {fix}"
        reason = self.error.strerror or str(self.error)
        return f"cannot listen on {where}: {reason}; set {u.variable} (or the host beside it) to one this machine can use"


def ports_of(settings: Settings) -> list[PortUse]:
    """What the worker listens on: each ComfyUI instance's port (``COMFYUI_PORT + i``) on each ``--listen``
    address; the API's in ``http`` mode (``PORT`` and ``PORT_HEALTH`` in ``runpod-lb`` mode); ``METRICS_PORT``
    in RunPod queue mode."""
    hosts = [h.strip() for h in settings.comfyui_host.split(",") if h.strip()] or ["127.0.0.1"]
    uses = [PortUse("COMFYUI_PORT", host, settings.comfyui_port + i, i)
            for i in range(settings.instances) for host in hosts]
    if settings.worker_mode == "http":
        uses.append(PortUse("API_PORT", settings.api_host, settings.api_port))
    elif settings.worker_mode == "runpod-lb":
        uses.append(PortUse("PORT", settings.api_host, settings.api_port))
        if settings.health_port is not None:
            uses.append(PortUse("PORT_HEALTH", settings.api_host, settings.health_port))
    elif settings.metrics_port is not None and settings.metrics_enabled:
        uses.append(PortUse("METRICS_PORT", settings.api_host, settings.metrics_port))
    return uses


def first_port_problem(settings: Settings) -> PortProblem | None:
    """The first port of :func:`ports_of` that cannot be listened on, or None when all are free."""
    for use in ports_of(settings):
        error = bind_error(use.host, use.port)
        if error is not None:
            holder = listener_of(use.port) if error.errno == errno.EADDRINUSE else None
            return PortProblem(use, error, holder)
    return None


def bind_error(host: str, port: int) -> OSError | None:
    """Why ``host:port`` cannot be bound for listening (on any address the host resolves to), or None."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return None  # not a port problem: the server's own start reports a host it cannot resolve
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return exc
    return None


def listener_of(port: int) -> str | None:
    """``pid N (name)`` of the process listening on ``port``, or None when the system does not say (another
    user's process, or no permission to list sockets). Only the name: a command line may hold secrets."""
    try:
        listening = [c for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid]
    except (psutil.Error, OSError):
        return None
    for conn in listening:
        try:
            return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
        except psutil.Error:
            continue
    return None
