"""Every setting of the worker, read from the environment once, into one typed immutable object.

Nothing else in the worker reads ``os.environ``: modules receive a :class:`Settings` (or the part of it they
need). A bad value is reported as one :class:`ConfigError` that lists every bad variable, what was given and
what is accepted -- except for secrets, whose values are never echoed.

The reference for every variable is ``docs/configuration.md``; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

TRUE_WORDS = frozenset({"1", "true", "yes"})
FALSE_WORDS = frozenset({"0", "false", "no"})
BOOL_ACCEPTED = "1/0/true/false/yes/no (any case)"

RESPONSE_FORMATS = ("worker-comfyui", "mime", "results", "base64-list")
IMAGE_FORMATS = ("png", "jpeg", "webp")
WORKER_MODES = ("http", "runpod", "runpod-lb")
RUNSYNC_ENVELOPES = ("runpod", "output")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

MB = 1024 * 1024
MAX_INSTANCES = 64
INSTANCES_ACCEPTED = (
    f"1 (the default), a number of instances from 1 to {MAX_INSTANCES}, auto (one per visible GPU), "
    "or a comma list of GPU ids (e.g. 0,1,3)"
)
NVIDIA_SMI_TIMEOUT_S = 10.0
GPU_ID = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z/_.-]+)$")

# Secrets of the worker itself: never echoed in errors, never passed on to ComfyUI's process tree.
WORKER_SECRETS = frozenset({"API_KEY", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "RUNPOD_AI_API_KEY",
                            "DATABASE_URL"})
DATABASE_SCHEMES = ("postgresql://", "postgres://")


class ConfigError(ValueError):
    """One or more environment variables hold values the worker cannot use."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


def parse_bool(text: str) -> bool:
    """The one boolean spelling set used everywhere (env vars and request options alike)."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(BOOL_ACCEPTED)


class _Reader:
    """Reads variables from one environment mapping, collecting every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value

    def _bad(self, name: str, value: str, accepted: str, secret: bool = False) -> None:
        shown = "<hidden>" if secret else repr(value)
        self.problems.append(f"{name}={shown} is not valid; accepted: {accepted}")

    def convert(self, name: str, default: T, conv: Callable[[str], T], accepted: str, secret: bool = False) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return conv(value.strip())
        except (ValueError, TypeError):
            self._bad(name, value, accepted, secret)
            return default

    def string(self, name: str, default: str = "") -> str:
        value = self.raw(name)
        return default if value is None else value.strip()

    def secret(self, name: str) -> str | None:
        value = self.raw(name)
        return None if value is None else value.strip()

    def boolean(self, name: str, default: bool) -> bool:
        return self.convert(name, default, parse_bool, BOOL_ACCEPTED)

    def integer(self, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        return self.convert(name, default, lambda s: _bounded(int(s), lo, hi), _range_text("an integer", lo, hi))

    def number(self, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        return self.convert(name, default, lambda s: _bounded(float(s), lo, hi), _range_text("a number", lo, hi))

    def choice(self, name: str, default: str, options: tuple[str, ...], upper: bool = False) -> str:
        def conv(s: str) -> str:
            s = s.upper() if upper else s.lower()
            if s not in options:
                raise ValueError
            return s

        return self.convert(name, default, conv, "one of " + ", ".join(options))

    def path(self, name: str, default: Path | None) -> Path | None:
        value = self.raw(name)
        return default if value is None else Path(value.strip()).expanduser()

    def words(self, name: str, sep: str = ",") -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        return tuple(w.strip() for w in value.split(sep) if w.strip())

    def argv(self, name: str) -> tuple[str, ...]:
        return self.convert(name, (), lambda s: tuple(shlex.split(s)), "a shell-quoted argument list")

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, 1, 65535)

    def optional_port(self, name: str) -> int | None:
        return self.convert(name, None, lambda s: _bounded(int(s), 1, 65535), _range_text("an integer", 1, 65535))


def _bounded(value: float, lo: float | None, hi: float | None) -> Any:
    if value != value:  # NaN
        raise ValueError
    if lo is not None and value < lo:
        raise ValueError
    if hi is not None and value > hi:
        raise ValueError
    return value


def _range_text(kind: str, lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{kind} from {lo} to {hi}"
    if lo is not None:
        return f"{kind} >= {lo}"
    if hi is not None:
        return f"{kind} <= {hi}"
    return kind


def _allowlist_entry(text: str) -> str:
    """A host name or a CIDR/address; normalised so the job engine can match it without parsing again."""
    text = text.strip().lower()
    if not text:
        raise ValueError
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        pass
    if any(c in text for c in "/:@ ") or text.startswith(".") or ".." in text:
        raise ValueError
    return text


LAUNCH_MODES = ("fork", "exec")


def default_launch() -> str:
    """``fork`` where the launcher works (Linux: pidfds, /proc), ``exec`` elsewhere."""
    return "fork" if sys.platform.startswith("linux") and hasattr(os, "pidfd_open") else "exec"


@dataclass(frozen=True)
class Settings:
    """The worker's whole configuration. Defaults suit a laptop; the image overrides a few with ``ENV``."""

    # --- ComfyUI process -------------------------------------------------------------------------------
    comfyui_dir: Path = Path("/opt/ComfyUI")
    comfyui_python: str = sys.executable
    comfyui_host: str = "127.0.0.1"
    comfyui_port: int = 8188
    comfyui_args: tuple[str, ...] = ()
    comfy_log_level: str = "INFO"
    # how ComfyUI is started: forked from a pre-imported parent, or exec'd afresh (supervision/launcher.py)
    comfyui_launch: str = "exec"
    launch_gc_freeze: bool = True  # fork mode: gc.freeze() in the parent before forking
    data_dir: Path = Path("data").resolve()
    models_dir: Path = Path("/opt/ComfyUI/models")
    volume_models_dir: Path = Path("/runpod-volume/models")
    workflows_dir: Path = Path("workflows").resolve()
    required_nodes: tuple[str, ...] = ()
    warmup_workflow: Path | None = None
    state_file: Path | None = None
    # One entry per ComfyUI instance (COMFYUI_INSTANCES): the CUDA_VISIBLE_DEVICES it gets, None to leave the
    # worker's own. Instance i listens on COMFYUI_PORT + i; with more than one, its folders are DATA_DIR/instance-i.
    instance_gpus: tuple[str | None, ...] = (None,)
    instances_note: str = ""  # how COMFYUI_INSTANCES was resolved (``auto``: what it saw), for the start-up log

    # --- supervision -----------------------------------------------------------------------------------
    start_timeout_s: float = 300.0
    ready_poll_s: float = 0.02
    health_interval_s: float = 5.0
    health_timeout_s: float = 5.0
    health_failures: int = 3
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    crash_loop_max: int = 5
    crash_loop_window_s: float = 300.0
    shutdown_grace_s: float = 30.0
    stop_timeout_s: float = 10.0
    log_ring_lines: int = 200

    # --- jobs ------------------------------------------------------------------------------------------
    job_timeout_s: float = 600.0
    interrupt_grace_s: float = 10.0
    max_job_timeout_s: float = 3600.0
    websocket_reconnect_attempts: int = 5
    websocket_reconnect_delay_s: float = 3.0
    progress_interval_s: float = 0.5
    max_input_bytes: int = 20 * MB
    max_input_pixels: int = 64_000_000
    allow_url_inputs: bool = True
    url_input_allowlist: tuple[str, ...] = ()
    url_input_timeout_s: float = 30.0
    max_output_bytes: int = 15 * MB
    keep_outputs: bool = False
    image_format: str = "png"
    image_quality: int = 90

    # --- object storage (S3-compatible) ----------------------------------------------------------------
    bucket_endpoint_url: str | None = None
    bucket_access_key_id: str | None = field(default=None, repr=False)
    bucket_secret_access_key: str | None = field(default=None, repr=False)
    bucket_name: str | None = None
    bucket_prefix: str = ""
    bucket_region: str = "us-east-1"
    bucket_url_expiry_s: int = 7 * 24 * 3600

    # --- front doors -----------------------------------------------------------------------------------
    worker_mode: str = "http"
    response_format: str = "worker-comfyui"
    max_concurrency: int = 1
    ready_wait_s: float = 600.0
    refresh_worker: bool = False
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    allow_unauthenticated: bool = False
    runsync_wait_s: float = 90.0
    max_request_bytes: int = 20 * MB
    header_timeout_s: float = 10.0
    body_timeout_s: float = 120.0
    max_connections: int = 512
    max_queue: int = 100
    job_retention_s: float = 3600.0
    journal_vacuum_interval_s: float = 600.0
    endpoint_id: str | None = None
    runsync_envelope: str = "runpod"
    health_port: int | None = None  # runpod-lb: PORT_HEALTH when it differs from the API's port

    # --- fleet (docs/fleet.md) -------------------------------------------------------------------------
    # Unset: the journal is SQLite under DATA_DIR. A postgresql:// URL: journal and queue shared by every worker.
    database_url: str | None = field(default=None, repr=False)
    worker_id: str = ""
    lease_s: float = 30.0
    fleet_inline_max_bytes: int = 8 * MB  # a Deploy upload up to this size is kept in PostgreSQL, else in S3

    # --- probes, metrics, build record -----------------------------------------------------------------
    metrics_enabled: bool = True
    metrics_public: bool = False
    metrics_port: int | None = None
    build_record_file: Path = Path("/opt/worker/build-record.json")
    # What `make build` set last in the image (ENV, no layer): stamped on the build record by /info.
    build_revision: str = ""
    build_source: str = ""
    build_created: str = ""

    # --- logging ---------------------------------------------------------------------------------------
    log_level: str = "INFO"

    # The environment ComfyUI is started with: the worker's own, minus the worker's secrets.
    child_env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def comfyui_url(self) -> str:
        host = self.comfyui_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.comfyui_port}"

    @property
    def instances(self) -> int:
        return len(self.instance_gpus)

    @property
    def jobs_per_instance(self) -> int:
        """How many jobs one instance runs at once: MAX_CONCURRENCY shared out over the instances."""
        return -(-self.max_concurrency // self.instances)

    def for_instance(self, index: int) -> "Settings":
        """The settings of ComfyUI instance ``index``: its port, its folders, its GPU. With one instance, these.

        The one place that lays instances out; the supervisors (which start them) and the job engines (which
        read their folders and talk to their ports) both ask here.
        """
        if not 0 <= index < self.instances:
            raise IndexError(f"instance {index} of {self.instances}")
        if self.instances == 1:
            return self
        gpu = self.instance_gpus[index]
        env = dict(self.child_env) if gpu is None else {**self.child_env, "CUDA_VISIBLE_DEVICES": gpu}
        return self.replace(comfyui_port=self.comfyui_port + index, data_dir=self.data_dir / f"instance-{index}",
                            child_env=env, state_file=None)

    @property
    def s3_enabled(self) -> bool:
        return bool(self.bucket_endpoint_url and self.bucket_access_key_id and self.bucket_secret_access_key)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with some fields changed (tests and the warm-up use this; the object itself never changes)."""
        return dataclasses.replace(self, **changes)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read every variable once; raise one ConfigError naming each bad one."""
    r = _Reader(os.environ if env is None else env)
    comfyui_dir = r.path("COMFYUI_DIR", Path("/opt/ComfyUI"))
    assert comfyui_dir is not None
    data_dir = r.path("DATA_DIR", Path("data"))
    assert data_dir is not None
    mode_default = "runpod" if r.raw("RUNPOD_WEBHOOK_GET_JOB") else "http"
    worker_mode = r.choice("WORKER_MODE", mode_default, WORKER_MODES)
    api_host, api_port, health_port = _listen_addresses(r, worker_mode)
    instance_gpus, instances_note = _instances(r)

    s = Settings(
        comfyui_dir=comfyui_dir.resolve(),
        comfyui_python=r.string("COMFYUI_PYTHON", sys.executable),
        comfyui_host=r.string("COMFYUI_HOST", "127.0.0.1"),
        comfyui_port=r.port("COMFYUI_PORT", 8188),
        comfyui_args=r.argv("COMFYUI_ARGS"),
        comfy_log_level=r.choice("COMFY_LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
        comfyui_launch=r.choice("COMFYUI_LAUNCH", default_launch(), LAUNCH_MODES),
        launch_gc_freeze=r.boolean("COMFYUI_LAUNCH_GC_FREEZE", True),
        data_dir=data_dir.resolve(),
        models_dir=(r.path("MODELS_DIR", comfyui_dir / "models") or comfyui_dir / "models").resolve(),
        volume_models_dir=r.path("VOLUME_MODELS_DIR", Path("/runpod-volume/models")) or Path("/runpod-volume/models"),
        workflows_dir=(r.path("WORKFLOWS_DIR", Path("workflows")) or Path("workflows")).resolve(),
        required_nodes=r.words("REQUIRED_NODES"),
        warmup_workflow=r.path("WARMUP_WORKFLOW", None),
        state_file=r.path("STATE_FILE", None),
        instance_gpus=instance_gpus,
        instances_note=instances_note,
        start_timeout_s=r.number("COMFYUI_START_TIMEOUT_S", 300.0, lo=1),
        ready_poll_s=r.number("READY_POLL_S", 0.02, lo=0.001, hi=0.05),
        health_interval_s=r.number("HEALTH_INTERVAL_S", 5.0, lo=0.05),
        health_timeout_s=r.number("HEALTH_TIMEOUT_S", 5.0, lo=0.05),
        health_failures=r.integer("HEALTH_FAILURES", 3, lo=1),
        restart_backoff_s=r.number("RESTART_BACKOFF_S", 1.0, lo=0),
        restart_backoff_max_s=r.number("RESTART_BACKOFF_MAX_S", 30.0, lo=0),
        crash_loop_max=r.integer("CRASH_LOOP_MAX", 5, lo=1),
        crash_loop_window_s=r.number("CRASH_LOOP_WINDOW_S", 300.0, lo=1),
        shutdown_grace_s=r.number("SHUTDOWN_GRACE_S", 30.0, lo=0),
        stop_timeout_s=r.number("STOP_TIMEOUT_S", 10.0, lo=0.1),
        log_ring_lines=r.integer("LOG_RING_LINES", 200, lo=1),
        job_timeout_s=r.number("JOB_TIMEOUT_S", 600.0, lo=0.1),
        interrupt_grace_s=r.number("INTERRUPT_GRACE_S", 10.0, lo=0.1),
        max_job_timeout_s=r.number("MAX_JOB_TIMEOUT_S", 3600.0, lo=0.1),
        websocket_reconnect_attempts=r.integer("WEBSOCKET_RECONNECT_ATTEMPTS", 5, lo=0),
        websocket_reconnect_delay_s=r.number("WEBSOCKET_RECONNECT_DELAY_S", 3.0, lo=0),
        progress_interval_s=r.number("PROGRESS_INTERVAL_S", 0.5, lo=0),
        max_input_bytes=r.integer("MAX_INPUT_BYTES", 20 * MB, lo=1),
        max_input_pixels=r.integer("MAX_INPUT_PIXELS", 64_000_000, lo=1),
        allow_url_inputs=r.boolean("ALLOW_URL_INPUTS", True),
        url_input_allowlist=tuple(
            r.convert("URL_INPUT_ALLOWLIST", (), _allowlist_list, "a comma list of host names, addresses or CIDRs")
        ),
        url_input_timeout_s=r.number("URL_INPUT_TIMEOUT_S", 30.0, lo=0.1),
        max_output_bytes=r.integer("MAX_OUTPUT_BYTES", 15 * MB, lo=1),
        keep_outputs=r.boolean("KEEP_OUTPUTS", False),
        image_format=r.choice("IMAGE_FORMAT", "png", IMAGE_FORMATS),
        image_quality=r.integer("IMAGE_QUALITY", 90, lo=1, hi=100),
        bucket_endpoint_url=r.raw("BUCKET_ENDPOINT_URL"),
        bucket_access_key_id=r.secret("BUCKET_ACCESS_KEY_ID"),
        bucket_secret_access_key=r.secret("BUCKET_SECRET_ACCESS_KEY"),
        bucket_name=r.raw("BUCKET_NAME"),
        bucket_prefix=r.string("BUCKET_PREFIX", "").strip("/"),
        bucket_region=r.string("BUCKET_REGION", "us-east-1"),
        bucket_url_expiry_s=r.integer("BUCKET_URL_EXPIRY_S", 7 * 24 * 3600, lo=1, hi=7 * 24 * 3600),
        worker_mode=worker_mode,
        response_format=r.choice("RESPONSE_FORMAT", "worker-comfyui", RESPONSE_FORMATS),
        max_concurrency=r.integer("MAX_CONCURRENCY", len(instance_gpus), lo=1, hi=64),
        ready_wait_s=r.number("READY_WAIT_S", 600.0, lo=0),
        refresh_worker=r.boolean("REFRESH_WORKER", False),
        api_host=api_host,
        api_port=api_port,
        api_key=r.secret("API_KEY"),
        allow_unauthenticated=r.boolean("ALLOW_UNAUTHENTICATED", False),
        runsync_wait_s=r.number("RUNSYNC_WAIT_S", 90.0, lo=0),
        max_request_bytes=r.integer("MAX_REQUEST_BYTES", 20 * MB, lo=1024),
        header_timeout_s=r.number("HEADER_TIMEOUT_S", 10.0, lo=0.1),
        body_timeout_s=r.number("BODY_TIMEOUT_S", 120.0, lo=0.1),
        max_connections=r.integer("MAX_CONNECTIONS", 512, lo=1),
        max_queue=r.integer("MAX_QUEUE", 100, lo=1),
        job_retention_s=r.number("JOB_RETENTION_S", 3600.0, lo=0),
        journal_vacuum_interval_s=r.number("JOURNAL_VACUUM_INTERVAL_S", 600.0, lo=0),
        endpoint_id=r.raw("RUNPOD_ENDPOINT_ID"),
        runsync_envelope=r.choice("RUNSYNC_ENVELOPE", "runpod", RUNSYNC_ENVELOPES),
        health_port=health_port,
        database_url=_database_url(r),
        worker_id=r.string("WORKER_ID", "") or f"{socket.gethostname()}-{os.getpid()}",
        lease_s=r.number("LEASE_S", 30.0, lo=1, hi=3600),
        fleet_inline_max_bytes=r.integer("FLEET_INLINE_MAX_BYTES", 8 * MB, lo=0),
        metrics_enabled=r.boolean("METRICS_ENABLED", True),
        metrics_public=r.boolean("METRICS_PUBLIC", False),
        metrics_port=r.optional_port("METRICS_PORT"),
        build_record_file=r.path("BUILD_RECORD_FILE", Settings.build_record_file) or Settings.build_record_file,
        build_revision=r.string("BUILD_REVISION"),
        build_source=r.string("BUILD_SOURCE"),
        build_created=r.string("BUILD_CREATED"),
        log_level=r.choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
        child_env={k: v for k, v in r.env.items() if k not in WORKER_SECRETS},
    )
    if s.restart_backoff_max_s < s.restart_backoff_s:
        r.problems.append(
            f"RESTART_BACKOFF_MAX_S={s.restart_backoff_max_s} is smaller than RESTART_BACKOFF_S="
            f"{s.restart_backoff_s}; accepted: a cap >= the first delay"
        )
    r.problems.extend(_port_clashes(s))
    if s.comfyui_launch == "fork" and default_launch() != "fork":
        r.problems.append(f"COMFYUI_LAUNCH=fork needs Linux with os.pidfd_open (this is {sys.platform}, Python "
                          f"{sys.version.split()[0]}); accepted here: exec")
    if bool(s.bucket_access_key_id) != bool(s.bucket_secret_access_key) or (
        (s.bucket_access_key_id or s.bucket_secret_access_key) and not s.bucket_endpoint_url
    ):
        r.problems.append(
            "BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY must be set together "
            "(values not shown); accepted: all three, or none"
        )
    if r.problems:
        raise ConfigError(r.problems)
    return s


def _database_url(r: _Reader) -> str | None:
    """DATABASE_URL: None (SQLite under DATA_DIR) or a postgresql:// URL; the value is never echoed."""
    url = r.secret("DATABASE_URL")
    if not url:
        return None
    if not url.startswith(DATABASE_SCHEMES):
        r.problems.append("DATABASE_URL is not a PostgreSQL URL (value not shown); accepted: unset, or "
                          "postgresql://user:password@host:port/database")
        return None
    return url


def _listen_addresses(r: _Reader, worker_mode: str) -> tuple[str, int, int | None]:
    """(API host, API port, separate health port or None).

    ``runpod-lb``: RunPod's load balancer sends requests to ``PORT`` (default 80) and probes ``/ping`` on
    ``PORT_HEALTH`` (default ``PORT``); those win over ``API_PORT``, and the API listens on every address
    unless ``API_HOST`` says otherwise (the platform's gateway is the only way in).
    """
    if worker_mode != "runpod-lb":
        return r.string("API_HOST", "127.0.0.1"), r.port("API_PORT", 8000), None
    port = r.port("PORT", 80)
    health = r.port("PORT_HEALTH", port)
    return r.string("API_HOST", "0.0.0.0"), port, (health if health != port else None)


def _port_clashes(s: Settings) -> list[str]:
    """The worker's own ports (the API's; METRICS_PORT in RunPod mode) must not be one of ComfyUI's
    (COMFYUI_PORT + i for each instance), which must all exist."""
    last = s.comfyui_port + s.instances - 1
    if last > 65535:
        return [f"COMFYUI_PORT={s.comfyui_port} with {s.instances} instances needs ports up to {last}; accepted: "
                f"COMFYUI_PORT <= {65535 - s.instances + 1} (instance i listens on COMFYUI_PORT + i)"]
    if s.worker_mode == "runpod":
        ours: tuple[tuple[str, int | None], ...] = (("METRICS_PORT", s.metrics_port),)
    else:
        ours = (("API_PORT" if s.worker_mode == "http" else "PORT", s.api_port), ("PORT_HEALTH", s.health_port))
    comfy = f"COMFYUI_PORT={s.comfyui_port}" if s.instances == 1 else (
        f"ComfyUI's ports {s.comfyui_port}-{last} (COMFYUI_PORT={s.comfyui_port}, {s.instances} instances)")
    problems = []
    for var, port in ours:
        if port is not None and s.comfyui_port <= port <= last:
            same = "are the same port" if s.instances == 1 else "overlap"
            problems.append(f"{var}={port} and {comfy} {same}; accepted: two different ports (the "
                            "worker and ComfyUI each listen on their own)")
    return problems


def _instances(r: _Reader) -> tuple[tuple[str | None, ...], str]:
    """COMFYUI_INSTANCES as one CUDA_VISIBLE_DEVICES value per instance (None: the worker's own), and a note."""
    raw = r.raw("COMFYUI_INSTANCES")
    visible = _visible_devices(r.env)
    if raw is None:
        return (None,), ""
    text = raw.strip().lower()
    if text == "auto":
        return _auto_instances(r.env, visible)
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= MAX_INSTANCES:
            r._bad("COMFYUI_INSTANCES", raw, INSTANCES_ACCEPTED)
            return (None,), ""
        if count == 1:
            return (None,), ""
        ids = [visible[i % len(visible)] if visible else str(i) for i in range(count)]
        return tuple(ids), f"COMFYUI_INSTANCES={count}: CUDA_VISIBLE_DEVICES {', '.join(ids)}"
    ids = [w.strip() for w in raw.split(",") if w.strip()]  # "3," is GPU 3 alone; "3" is three instances
    if not ids or len(ids) > MAX_INSTANCES or not all(GPU_ID.match(w) for w in ids):
        r._bad("COMFYUI_INSTANCES", raw, INSTANCES_ACCEPTED)
        return (None,), ""
    return tuple(ids), f"COMFYUI_INSTANCES={raw.strip()}: one instance per listed GPU"


def _visible_devices(env: Mapping[str, str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list (empty: no GPU may be used), or None when it is not set."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    ids = [w.strip() for w in value.split(",") if w.strip()]
    return [] if not ids or ids[0].startswith("-") else ids


def _auto_instances(env: Mapping[str, str], visible: list[str] | None) -> tuple[tuple[str | None, ...], str]:
    """``auto``: one instance per GPU in CUDA_VISIBLE_DEVICES if set, else per GPU ``nvidia-smi -L`` lists."""
    if visible is not None:
        source = f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')!r}"
        gpus = visible
    else:
        gpus, source = _nvidia_smi_gpus(env)
    if not gpus:
        return (None,), f"COMFYUI_INSTANCES=auto: no GPU visible ({source}); one instance"
    return tuple(gpus), f"COMFYUI_INSTANCES=auto: {len(gpus)} GPU(s) from {source}: {', '.join(gpus)}"


def _nvidia_smi_gpus(env: Mapping[str, str]) -> tuple[list[str], str]:
    """The indices ``nvidia-smi -L`` lists (``GPU 0: NVIDIA ... (UUID: ...)``), and what was asked."""
    tool = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if tool is None:
        return [], "no nvidia-smi on PATH"
    try:
        done = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S,
                              env=dict(env), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi -L failed: {exc}"
    if done.returncode != 0:
        first = (done.stderr or done.stdout).strip().splitlines()
        return [], f"nvidia-smi -L exited with {done.returncode}" + (f": {first[0]}" if first else "")
    gpus = [m.group(1) for m in re.finditer(r"^GPU (\d+):", done.stdout, re.MULTILINE)]
    return gpus, "nvidia-smi -L"


def _allowlist_list(text: str) -> tuple[str, ...]:
    return tuple(_allowlist_entry(w) for w in text.split(",") if w.strip())
