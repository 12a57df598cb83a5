"""The worker's Prometheus metrics: one registry, every family, and the calls that record them.

Several parts record (the supervisor: ComfyUI's readiness, restarts, start time and GPU memory; the job
engine: phase durations and bytes; the front doors: job counts, queue depth, time in the queue), and the
front doors serve the registry (``GET /metrics``), so it sits below all of them. One
:class:`WorkerMetrics` per worker, made by ``main`` and handed down. With ``METRICS_ENABLED=false`` every
recording call returns at once and nothing is served.

The families and their labels are a public contract (dashboards and alerts use them); ``docs/operations.md``
lists each with a PromQL example. ``instance`` names the ComfyUI instance (``"0"``, ``"1"``..., one per
``COMFYUI_INSTANCES``). Every labelled family is created with its known label values at zero, so ``rate()``
and ``increase()`` see a series from the first scrape instead of from the first event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

disable_created_metrics()  # no *_created series: they double the output and no query here needs them

INSTANCE = "0"
FRONT_DOORS = ("api", "deploy", "runpod")
JOB_STATUSES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
PHASES = ("queue", "inputs", "comfyui", "outputs", "total")
RESTART_REASONS = ("exited", "exited_starting", "hung", "start_timeout", "readiness_failed", "spawn_failed",
                   "stuck_prompt")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class WorkerMetrics:
    """Every metric family of the worker on a registry of its own. Thread-safe (the supervisor records from its
    own thread); each call is a few dictionary operations under a lock, so recording never slows a job."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()
        reg = self.registry
        self.jobs = Counter("comfyui_worker_jobs", "Jobs finished, by the front door they came through and "
                            "their final status", ["front_door", "status"], registry=reg)
        self.queue_depth = Gauge("comfyui_worker_queue_depth", "Jobs accepted and waiting to start", registry=reg)
        self.in_progress = Gauge("comfyui_worker_jobs_in_progress", "Jobs running now", registry=reg)
        self.duration = Histogram("comfyui_worker_job_duration_seconds", "Time of each phase of a job: queue "
                                  "(accepted to started), inputs, comfyui (the prompt's run), outputs, total "
                                  "(accepted to finished)", ["phase"], buckets=DURATION_BUCKETS, registry=reg)
        self.comfyui_ready = Gauge("comfyui_worker_comfyui_ready", "1 while ComfyUI serves jobs (ready or "
                                   "degraded), else 0", ["instance"], registry=reg)
        self.restarts = Counter("comfyui_worker_comfyui_restarts", "ComfyUI restarts, by why the previous "
                                "process ended", ["instance", "reason"], registry=reg)
        self.start_seconds = Gauge("comfyui_worker_comfyui_start_seconds", "Seconds from ComfyUI's last spawn "
                                   "to ready", ["instance"], registry=reg)
        self.input_bytes = Counter("comfyui_worker_input_bytes", "Bytes of input images received (decoded)",
                                   registry=reg)
        self.output_bytes = Counter("comfyui_worker_output_bytes", "Bytes of output files returned (before "
                                    "base64)", registry=reg)
        self.gpu_used = Gauge("comfyui_worker_gpu_memory_used_bytes", "Device memory in use, as ComfyUI's "
                              "/system_stats reports it", ["instance", "device"], registry=reg)
        self.gpu_total = Gauge("comfyui_worker_gpu_memory_total_bytes", "Device memory, as ComfyUI's "
                               "/system_stats reports it", ["instance", "device"], registry=reg)
        self._phase = {p: self.duration.labels(phase=p) for p in PHASES}
        self.declare_instance(INSTANCE)
        if enabled:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)

    @classmethod
    def disabled(cls) -> "WorkerMetrics":
        """What a part records into when nobody gave it metrics (tests, tools): nothing is kept."""
        return cls(enabled=False)

    # --- the front doors ------------------------------------------------------------------------------

    def front_door(self, name: str) -> None:
        """Declare a front door: its job counts exist (at zero) from now on."""
        for status in JOB_STATUSES:
            self.jobs.labels(front_door=name, status=status)

    def track_jobs(self, queue_depth: Callable[[], float], in_progress: Callable[[], float]) -> None:
        """The gauges read the front door's own counts at scrape time: nothing to record per job."""
        if self.enabled:
            self.queue_depth.set_function(queue_depth)
            self.in_progress.set_function(in_progress)

    def fleet_worker(self, worker_id: str, shared_queue: Callable[[], float]) -> None:
        """A worker of a fleet (DATABASE_URL): its WORKER_ID as a label, the fleet's shared queue as a gauge."""
        if self.enabled:
            Gauge("comfyui_worker_fleet_worker", "1, labelled with this worker's WORKER_ID (fleet mode)",
                  ["worker_id"], registry=self.registry).labels(worker_id=worker_id).set(1)
            Gauge("comfyui_worker_fleet_queue_depth", "Jobs waiting in the fleet's shared queue (PostgreSQL)",
                  registry=self.registry).set_function(shared_queue)

    def job_finished(self, front_door: str, status: str, total_s: float | None) -> None:
        if not self.enabled:
            return
        self.jobs.labels(front_door=front_door, status=status).inc()
        if total_s is not None:
            self._phase["total"].observe(max(total_s, 0.0))

    def phase(self, name: str, seconds: float) -> None:
        """One phase of one job took ``seconds`` (observed when the phase completes)."""
        if self.enabled:
            self._phase[name].observe(max(seconds, 0.0))

    def inputs_received(self, nbytes: int) -> None:
        if self.enabled and nbytes:
            self.input_bytes.inc(nbytes)

    def outputs_returned(self, nbytes: int) -> None:
        if self.enabled and nbytes:
            self.output_bytes.inc(nbytes)

    # --- the supervisor -------------------------------------------------------------------------------

    def declare_instance(self, instance: str) -> None:
        """A ComfyUI instance exists: its readiness and restart series exist (at zero) from now on."""
        self.comfyui_ready.labels(instance=instance).set(0)
        for reason in RESTART_REASONS:
            self.restarts.labels(instance=instance, reason=reason)

    def comfyui_serving(self, serving: bool, instance: str = INSTANCE) -> None:
        if self.enabled:
            self.comfyui_ready.labels(instance=instance).set(1 if serving else 0)

    def comfyui_started(self, seconds: float, instance: str = INSTANCE) -> None:
        if self.enabled:
            self.start_seconds.labels(instance=instance).set(seconds)

    def comfyui_restarted(self, reason: str, instance: str = INSTANCE) -> None:
        if self.enabled:
            self.restarts.labels(instance=instance, reason=reason).inc()

    def devices(self, devices: Iterable[Mapping[str, Any]], instance: str = INSTANCE) -> None:
        """Device memory from ``/system_stats``'s ``devices`` (``vram_total``, ``vram_free`` in bytes)."""
        if not self.enabled:
            return
        for dev in devices:
            total, free = dev.get("vram_total"), dev.get("vram_free")
            if not isinstance(total, (int, float)) or not isinstance(free, (int, float)):
                continue
            name = device_label(dev)
            self.gpu_total.labels(instance=instance, device=name).set(total)
            self.gpu_used.labels(instance=instance, device=name).set(max(total - free, 0))

    # --- serving --------------------------------------------------------------------------------------

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the exposition format the scraper asked for (``Accept``): body and content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def device_label(device: Mapping[str, Any]) -> str:
    """``cuda:0``, ``cpu``...: short and stable (ComfyUI's ``name`` also carries the model and allocator)."""
    kind = str(device.get("type") or "device")
    index = device.get("index")
    return kind if index is None else f"{kind}:{index}"
