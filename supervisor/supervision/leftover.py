"""A ComfyUI left behind by an earlier worker of ours on the same DATA_DIR: recognised, and its tree stopped.

A worker killed with ``kill -9`` outside a container cannot stop its ComfyUI, which keeps the port. The next
worker would refuse that port (:mod:`supervisor.supervision.ports` refuses any server already on it), and an
operator would have to find and kill the orphan by hand. So every supervisor writes ``comfyui.pid`` in its data
folder when it spawns ComfyUI (the pid, the tree marker in the process's environment, its start time and port)
and removes it when it has stopped it. Before the port check, ``main`` reads those files: a process that is
still alive *and* carries the recorded marker is ours, and its whole tree (group, descendants and marker holders)
is stopped, SIGTERM then SIGKILL. A pid reused by something else (no marker, or another one) is left alone, and
the port check then refuses whatever holds the port, as before.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import psutil

from supervisor.config import Settings
from supervisor.supervision.process import TREE_MARKER_VAR, find_tree

log = logging.getLogger("supervisor")

PID_FILE = "comfyui.pid"
TERM_WAIT_S = 5.0  # how long a leftover tree gets to leave after SIGTERM before SIGKILL


@dataclass(frozen=True)
class PidRecord:
    """What a supervisor writes about the ComfyUI it spawned."""

    pid: int
    marker: str
    port: int
    created: float  # psutil's create_time of the process: a reused pid has another one

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "marker": self.marker, "port": self.port, "created": self.created})

    @classmethod
    def read(cls, path: Path) -> "PidRecord | None":
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            return cls(int(body["pid"]), str(body["marker"]), int(body["port"]), float(body["created"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def write_pid_file(data_dir: Path, pid: int, marker: str, port: int) -> None:
    """Record the ComfyUI just spawned (atomically: a worker killed mid-write leaves the old file or none)."""
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        return  # already gone: nothing to leave behind
    path = data_dir / PID_FILE
    tmp = path.with_suffix(".pid.tmp")
    try:
        tmp.write_text(PidRecord(pid, marker, port, created).to_json(), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write %s (%s): a ComfyUI left by a killed worker would not be recognised", path, exc)


def remove_pid_file(data_dir: Path, pid: int) -> None:
    """Forget the ComfyUI with this pid once it is stopped (only if the file still names it)."""
    path = data_dir / PID_FILE
    record = PidRecord.read(path)
    if record is not None and record.pid == pid:
        path.unlink(missing_ok=True)


def stop_leftovers(settings: Settings) -> list[str]:
    """Stop every ComfyUI tree an earlier worker left in this worker's data folders; one line per tree stopped."""
    stopped = []
    for index in range(settings.instances):
        data_dir = settings.for_instance(index).data_dir
        line = stop_leftover(data_dir)
        if line:
            stopped.append(line)
    return stopped


def stop_leftover(data_dir: Path) -> str | None:
    """Stop the tree ``data_dir/comfyui.pid`` names if it is still ours; say what was done (None: nothing)."""
    path = data_dir / PID_FILE
    record = PidRecord.read(path)
    if record is None:
        path.unlink(missing_ok=True)  # unreadable: no use to anyone
        return None
    root = _ours(record)
    if root is None:
        path.unlink(missing_ok=True)  # gone, or the pid now belongs to another process: not ours to touch
        return None
    tree = find_tree(root, record.pid, record.marker)
    for proc in tree:
        _signal(proc, signal.SIGTERM)
    _, alive = psutil.wait_procs(list(tree), timeout=TERM_WAIT_S)
    for proc in alive:
        _signal(proc, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=TERM_WAIT_S)
    path.unlink(missing_ok=True)
    how = "SIGKILL" if alive else "SIGTERM"
    return (f"stopped a ComfyUI left by an earlier worker on {data_dir} (pid {record.pid}, port {record.port}, "
            f"{len(tree)} process(es), {how})")


def _ours(record: PidRecord) -> psutil.Process | None:
    """The recorded process if it is alive and is the one we spawned (same start time, our marker)."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.created) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if proc.environ().get(TREE_MARKER_VAR) != record.marker:
            return None
    except psutil.Error:
        return None
    return proc


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass
