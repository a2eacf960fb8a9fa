"""Prometheus metrics for one app: jobs from the UI and the API alike (counted by a manager observer), their
latencies, the queue, memory and the engine cache. Each app owns its CollectorRegistry: no global state, so
several apps (tests) can run in one process."""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from pipelines.loading import ModelAccessError
from pipelines.manager import InternalError, Job, JobState
from pipelines.request import RequestError
from pipelines.residency import InsufficientMemoryError
from pipelines.run_context import JobCancelled
from pipelines.sampling import NumericsError

from .service import PrismService

# Why a job failed, as a label: first matching type wins.
FAILURE_REASONS = ((RequestError, "bad_request"), (ModelAccessError, "model_unavailable"),
                   (InsufficientMemoryError, "out_of_memory"), (NumericsError, "numerics"),
                   (JobCancelled, "cancelled"), (InternalError, "internal"))
# A demo-model step takes ~1 ms on a CPU, a full-size FLUX.1-dev step ~0.1-1 s on a GPU, longer on a CPU.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A demo image well under a second; a first full-size job includes loading (and TensorRT builds: minutes).
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class PrismMetrics:
    def __init__(self, service: PrismService):
        self.service = service
        self.registry = CollectorRegistry()
        self.jobs = Counter("prism_jobs", "Jobs the manager finished (web UI and API), by model, outcome and "
                            "failure reason.", ["model", "outcome", "reason"], registry=self.registry)
        self.job_seconds = Histogram("prism_job_seconds", "Run time of each successful job: loading, text "
                                     "encoders, denoising and VAE (not the wait in the queue).", ["model"],
                                     buckets=JOB_BUCKETS, registry=self.registry)
        self.step_seconds = Histogram("prism_step_seconds", "Duration of each denoising step.", ["model"],
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.api_requests = Counter("prism_api_requests", "HTTP API requests answered, by endpoint and status.",
                                    ["endpoint", "status"], registry=self.registry)
        self.registry.register(_LiveValues(service))
        service.manager.job_observers.append(self.observe_job)

    def observe_job(self, job: Job) -> None:
        """Called on the manager's worker thread with each finished job."""
        try:
            model = self.service.choice_for(job.request).name
        except RequestError:  # a request for a model this app does not offer (it failed)
            model = "unknown"
        try:
            result = job.result(timeout=0)
        except Exception as exc:
            reason = next((name for kind, name in FAILURE_REASONS if isinstance(exc, kind)), "other")
            self.jobs.labels(model, job.state.value, reason).inc()
            return
        self.jobs.labels(model, JobState.DONE.value, "none").inc()
        timings = result.timings
        self.job_seconds.labels(model).observe((timings.total_ms + timings.load_ms) / 1000)
        for ms in timings.steps_ms:
            self.step_seconds.labels(model).observe(ms / 1000)

    def count_request(self, endpoint: str, status: int) -> None:
        self.api_requests.labels(endpoint, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveValues:
    """Values read at each scrape: the queue, memory and the engine cache."""

    def __init__(self, service: PrismService):
        self.service = service

    def collect(self) -> Iterator[Any]:
        manager = self.service.manager
        status = manager.status()
        yield _gauge("prism_queue_length", "Jobs waiting for the worker (not counting the running one).", status.queued)
        yield _gauge("prism_job_running", "1 while the worker runs a job.", int(status.running is not None))
        yield _gauge("prism_worker_alive", "1 while the manager's worker thread is alive.", int(manager.worker_alive))
        yield _gauge("prism_memory_budget_bytes", "Device memory Prism may use for models (--memory-budget).",
                     status.budget_bytes)
        yield _gauge("prism_resident_bytes", "Model weights Prism holds on the device.", status.used_bytes)
        yield _gauge("prism_parked_bytes", "Evicted model weights kept in host RAM for a quick return.",
                     status.parked_bytes)
        info, memory = manager.info, self.service.memory()
        kind = ("unified" if info.unified else "gpu") if info.is_cuda else "system"
        used = GaugeMetricFamily("prism_device_memory_used_bytes", "Memory in use on the device, by every process "
                                 "(kind: gpu, unified or, without a GPU, system RAM).", labels=["kind"])
        used.add_metric([kind], memory.used_bytes)
        total = GaugeMetricFamily("prism_device_memory_total_bytes", "The device's memory.", labels=["kind"])
        total.add_metric([kind], memory.total_bytes)
        yield used
        yield total
        entries = manager.engine_cache.entries()
        built = [e.manifest.build_seconds for e in entries if e.manifest is not None]
        yield _gauge("prism_engine_builds", "Engines built and present in the engine cache.", len(built))
        yield _gauge("prism_engine_build_seconds", "Total build time of the engines in the engine cache.", sum(built))
        yield _gauge("prism_engine_cache_bytes", "Size of the engine cache.", sum(e.size for e in entries))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
