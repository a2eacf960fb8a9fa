"""PipelineManager: the one owner of the GPU. A bounded queue, one worker per device, lazy loading,
memory residency, and errors that leave the worker serving the next job.

The UI, the CLI and any API submit GenerationRequests here and get GenerationResults (or an
exception whose message says what to change) back.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch

from .backends import BackendChoice, TensorRTStatus, choose_backend, tensorrt_status
from .backends.torch_backend import TorchBackend, TorchOptions
from .components import (FAMILY_MODULES, LIGHT_PARTS, ComponentKey, LoadedComponent, activation_bytes,
                         component_dtype, component_key, dtype_policy, estimate_bytes, stages)
from .engine_cache import EngineCache
from .gpu import DeviceInfo, parse_memory, probe_device, resolve_device, system_memory
from .loading import HubOptions, WeightSource, check_access
from .precision import Backend, Precision, precision_support
from .registry import ModelSpec, UnknownModelError, resolve_spec
from .request import GenerationRequest, GenerationResult, RequestError, resolve_request
from .residency import InsufficientMemoryError, Residency, human_bytes
from .run_context import JobCancelled, Progress, RunContext

log = logging.getLogger("prism.manager")


class QueueFullError(RuntimeError):
    """The queue is at its limit; the caller should try again shortly."""


@dataclass(frozen=True)
class ManagerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: str = "auto"  # auto | torch | tensorrt
    memory_budget: str | None = None  # "40GB", "512MB" or a fraction of device memory; None: most of it
    compile: bool = False  # torch.compile the denoiser (GPU only)
    random_weights: bool = False  # Hub models get their architecture with random weights (benchmarks)
    hub: HubOptions = HubOptions()
    max_queue: int = 4  # waiting jobs; one more is refused at once (0: none wait, one job runs at a time)
    engine_cache_dir: Path | None = None
    min_working_bytes: int = 512 * 2**20  # kept free beyond the weights even for tiny images


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class Job:
    id: int
    request: GenerationRequest
    on_progress: Callable[[Progress], None] | None = None
    state: JobState = JobState.QUEUED
    progress: Progress | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _result: GenerationResult | None = None
    _error: BaseException | None = None

    def cancel(self) -> None:
        self.cancel_event.set()

    def report(self, progress: Progress) -> None:
        self.progress = progress
        if self.on_progress is not None:
            try:
                self.on_progress(progress)
            except Exception:  # a broken listener (closed browser tab) must not fail the job
                log.debug("progress listener failed", exc_info=True)

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"Job {self.id} did not finish within {timeout} s.")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _finish(self, state: JobState, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        self.state, self._result, self._error = state, result, error
        self._done.set()


class InternalError(RuntimeError):
    """An unexpected failure; the worker logged the traceback and carries on."""


@dataclass(frozen=True)
class ResidentInfo:
    key: ComponentKey
    nbytes: int
    parked: bool


@dataclass(frozen=True)
class ManagerStatus:
    device: DeviceInfo
    budget_bytes: int
    used_bytes: int
    parked_bytes: int
    resident: tuple[ResidentInfo, ...]
    queued: int
    running: GenerationRequest | None
    tensorrt: TensorRTStatus
    backend_note: str  # which backend `auto` picks for 16-bit work here, and why
    engine_cache_dir: Path
    engine_cache_bytes: int
    events: tuple[str, ...]


class PipelineManager:
    def __init__(self, config: ManagerConfig = ManagerConfig(), *, device_info: DeviceInfo | None = None,
                 backends: dict[Backend, Any] | None = None):
        self.config = config
        self.device = device_info.device if device_info else resolve_device(config.device)
        self.info = device_info or probe_device(self.device)
        budget = (parse_memory(config.memory_budget, self.info.total_bytes) if config.memory_budget
                  else default_budget(self.info))
        _, host_free = system_memory()
        self.residency = Residency(budget, self.device, can_park=self.info.is_cuda and not self.info.unified,
                                   park_budget_bytes=int(host_free * 0.5))
        self.engine_cache = EngineCache(config.engine_cache_dir)
        self._backends: dict[Backend, Any] = dict(backends or {})
        self._backends.setdefault(Backend.TORCH, TorchBackend(TorchOptions(
            compile=config.compile, stage_on_host=self.info.is_cuda and not self.info.unified,
            compile_cache_dir=self.engine_cache.root / "torch-inductor")))
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._running: Job | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._worker = threading.Thread(target=self._work, name=f"prism-worker-{self.device}", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ submitting

    def submit(self, request: GenerationRequest, on_progress: Callable[[Progress], None] | None = None) -> Job:
        """Queue a job, or raise QueueFullError at once when `max_queue` jobs are already waiting."""
        with self._lock:
            if self.config.max_queue == 0 and (self._waiting or self._running):  # no waiting line: one job at a time
                raise QueueFullError("The server is busy with another job and keeps no waiting line "
                                     "(--max-queue 0). Try again in a moment.")
            if self.config.max_queue and len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"The server is busy: {len(self._waiting)} jobs are already waiting. "
                                     "Try again in a moment.")
            job = Job(next(self._ids), request, on_progress)
            self._waiting.append(job)
            position = len(self._waiting) + (1 if self._running else 0)
        job.report(Progress("queue", 0, 1, f"queued: {position - 1} job(s) ahead" if position > 1 else "starting"))
        self._queue.put(job)
        return job

    def generate(self, request: GenerationRequest, on_progress: Callable[[Progress], None] | None = None,
                 timeout: float | None = None) -> GenerationResult:
        return self.submit(request, on_progress).result(timeout)

    def queue_position(self, job: Job) -> int:
        """Jobs ahead of `job` (0 when it is running or next)."""
        with self._lock:
            if job not in self._waiting:
                return 0
            return self._waiting.index(job) + (1 if self._running else 0)

    def close(self) -> None:
        """Cancel the waiting and running jobs (a running one stops at its next step) and stop the worker."""
        with self._lock:
            jobs = [*self._waiting, *([self._running] if self._running else [])]
        for job in jobs:
            job.cancel()
        self._queue.put(None)
        self._worker.join(timeout=10)

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting.remove(job)
                self._running = job
            try:
                if job.cancel_event.is_set():
                    raise JobCancelled("The job was cancelled before it started.")
                job.state = JobState.RUNNING
                job._finish(JobState.DONE, result=self._run(job))
            except JobCancelled as exc:
                job._finish(JobState.CANCELLED, error=exc)
            except (RequestError, InsufficientMemoryError) as exc:
                job._finish(JobState.FAILED, error=exc)
            except Exception as exc:
                if not _is_user_facing(exc):
                    log.error("job %d failed:\n%s", job.id, traceback.format_exc())
                    exc = InternalError(f"Generation failed unexpectedly ({type(exc).__name__}: {exc}). "
                                        "The server is still running; the log has the details.")
                job._finish(JobState.FAILED, error=exc)
            finally:
                with self._lock:
                    self._running = None
                self._notify_waiting()

    def _notify_waiting(self) -> None:
        with self._lock:
            waiting = list(self._waiting)
        for i, job in enumerate(waiting):
            job.report(Progress("queue", 0, 1, f"queued: {i} job(s) ahead" if i else "starting"))

    def _run(self, job: Job) -> GenerationResult:
        req = job.request
        try:
            spec = resolve_spec(req.model)
            precision = Precision.parse(req.precision)
            choice = choose_backend(req.backend if req.backend != "auto" else self.config.backend,
                                    self.info.capability, precision)
        except (UnknownModelError, ValueError) as exc:
            raise RequestError(str(exc)) from None
        resolved = resolve_request(req, spec, self.info.capability, choice.backend)
        source = WeightSource(random_weights=self.config.random_weights and spec.local_dir is None, hub=self.config.hub)
        check_access(spec, source)
        working = self._working_bytes(spec, resolved)
        self.check_fits(spec, precision, choice.backend, working, source)
        ctx = RunContext(torch.device(self.device), on_progress=job.report, cancel=job.cancel_event)
        try:
            return self._generate(spec, resolved, choice, source, ctx, working)
        except torch.OutOfMemoryError:
            # One retry with nothing else resident; the estimate or another process may have been off.
            self.residency.evict_all("out of memory: retrying once with nothing else loaded")
            try:
                return self._generate(spec, resolved, choice, source, ctx, working)
            except torch.OutOfMemoryError:
                self.residency.evict_all("out of memory twice")
                raise InsufficientMemoryError(
                    f"Out of GPU memory running {spec.id} at {precision.value} {resolved.width}x{resolved.height} "
                    f"x{resolved.num_images}, even with every other model unloaded. "
                    f"{self._smaller_precision_hint(spec, precision, choice.backend, working, source)}") from None

    def _generate(self, spec: ModelSpec, req: GenerationRequest, choice: BackendChoice, source: WeightSource,
                  ctx: RunContext, working: int) -> GenerationResult:
        parts = JobParts(self, spec, Precision.parse(req.precision), choice.backend, source, ctx, working)
        if self.info.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        out = FAMILY_MODULES[spec.family].generate(spec, parts, req, ctx)
        peak = torch.cuda.max_memory_allocated(self.device) if self.info.is_cuda else None
        backend = self._backend(choice.backend)
        warnings = out.warnings + ((choice.reason,) if choice.backend is Backend.TORCH and req.backend == "tensorrt" else ())
        return GenerationResult(
            request=req, model_id=spec.id, images=out.images, seeds=tuple(req.seed + i for i in range(req.num_images)),
            timings=replace(out.timings, load_ms=parts.load_ms), peak_memory_bytes=peak,
            backend=backend.describe(), runs_as=parts.runs_as or Precision.parse(req.precision).label,
            device=self.info.name, warnings=warnings)

    # ------------------------------------------------------------------ memory planning

    def _working_bytes(self, spec: ModelSpec, req: GenerationRequest) -> int:
        vae_dtype = component_dtype(spec, "vae", req.precision, **self.dtype_policy)
        return self.config.min_working_bytes + activation_bytes(spec, req.width, req.height, req.num_images,
                                                                torch.empty((), dtype=vae_dtype).element_size())

    def _component_bytes(self, spec: ModelSpec, name: str, precision: Precision, backend: Backend) -> int:
        if name in LIGHT_PARTS:
            return 0
        key = component_key(spec, name, precision, backend.value, **self.dtype_policy)
        entry = self.residency.entries.get(key)
        return entry.component.nbytes if entry else estimate_bytes(spec, name, precision, **self.dtype_policy)

    def stage_bytes(self, spec: ModelSpec, precision: Precision, backend: Backend) -> list[tuple[tuple[str, ...], int]]:
        return [(stage, sum(self._component_bytes(spec, n, precision, backend) for n in stage)) for stage in stages(spec)]

    def stage_needs(self, spec: ModelSpec, precision: Precision, backend: Backend, working: int,
                    source: WeightSource = WeightSource()) -> list[tuple[tuple[str, ...], int]]:
        """Per stage, the most memory it holds at once: its weights plus working memory, or a load's peak."""
        out = []
        for stage, weights in self.stage_bytes(spec, precision, backend):
            peaks = [weights - self._component_bytes(spec, n, precision, backend) + self._load_peak(spec, n, precision, backend, source)
                     for n in stage if n not in LIGHT_PARTS]
            out.append((stage, max([weights + working, *peaks])))
        return out

    def _load_peak(self, spec: ModelSpec, name: str, precision: Precision, backend: Backend, source: WeightSource) -> int:
        key = component_key(spec, name, precision, backend.value, **self.dtype_policy)
        if key in self.residency.entries:
            return 0  # already loaded (or parked): no load peak
        peak = getattr(self._backend(backend), "load_peak_bytes", None)
        if peak is None:
            return estimate_bytes(spec, name, precision, **self.dtype_policy)
        return peak(spec, name, precision, self._bf16_ok, self.device, source)

    def check_fits(self, spec: ModelSpec, precision: Precision, backend: Backend, working: int,
                   source: WeightSource = WeightSource()) -> None:
        """Raise InsufficientMemoryError (needed, free, and a smaller precision that fits) before loading anything."""
        stage, need = max(self.stage_needs(spec, precision, backend, working, source), key=lambda s: s[1])
        if need <= self.residency.budget_bytes:
            return
        free = max(self.residency.budget_bytes - self.residency.used_bytes(), 0)
        raise InsufficientMemoryError(
            f"{spec.id} at {precision.value} needs {human_bytes(need)} at once "
            f"({' + '.join(n for n in stage if n not in LIGHT_PARTS)} and {human_bytes(working)} of working memory); "
            f"the memory budget is {human_bytes(self.residency.budget_bytes)} and {human_bytes(free)} of it is free now. "
            f"{self._smaller_precision_hint(spec, precision, backend, working, source)}")

    def _smaller_precision_hint(self, spec: ModelSpec, precision: Precision, backend: Backend, working: int,
                                source: WeightSource = WeightSource()) -> str:
        order = [Precision.BF16, Precision.FP8, Precision.FP4]
        smaller = order[order.index(precision) + 1:] if precision in order else order[1:]
        for candidate in smaller:
            if not precision_support(candidate, self.info.capability, backend).runnable:
                continue
            need = max(n for _, n in self.stage_needs(spec, candidate, backend, working, source))
            if need <= self.residency.budget_bytes:
                return f"{candidate.value} would fit (needs {human_bytes(need)}): choose it, or a smaller image size."
        return "No smaller precision fits either: raise --memory-budget, free memory, or choose a smaller model or image."

    @property
    def _bf16_ok(self) -> bool:
        return dtype_policy(self.info.capability)["cuda_bf16"]

    @property
    def dtype_policy(self) -> dict[str, bool]:
        """What decides each component's dtype on this device (see components.compute_dtype)."""
        return {"cuda_bf16": self._bf16_ok, "cpu": not self.info.is_cuda}

    # ------------------------------------------------------------------ backends, status, unloading

    def _backend(self, kind: Backend) -> Any:
        if kind not in self._backends:
            from .backends.tensorrt.backend import TensorRTBackend  # heavy, optional: only when chosen

            self._backends[kind] = TensorRTBackend(self.engine_cache)
        return self._backends[kind]

    def status(self) -> ManagerStatus:
        with self._lock:
            queued, running = len(self._waiting), (self._running.request if self._running else None)
        trt = tensorrt_status(self.info.capability)
        choice = choose_backend(self.config.backend if self.config.backend != "tensorrt" else "auto",
                                self.info.capability, Precision.BF16)
        resident = tuple(ResidentInfo(r.component.key, r.component.nbytes, r.parked) for r in self.residency.resident())
        return ManagerStatus(self.info, self.residency.budget_bytes, self.residency.used_bytes(),
                             self.residency.parked_bytes(), resident, queued, running, trt, choice.reason,
                             self.engine_cache.root, self.engine_cache.total_bytes(),
                             tuple(str(e) for e in self.residency.events[-20:]))

    def unload(self, model: str | None = None) -> int:
        """Unload one model (or all); returns bytes released. Waits for the running job's memory lock."""
        if model is None:
            freed = self.residency.used_bytes() + self.residency.parked_bytes()
            self.residency.evict_all("unloaded by the user")
            return freed
        return self.residency.drop_model(model)


class JobParts:
    """One job's view of its model's components: loads through the residency on first `get`."""

    def __init__(self, manager: PipelineManager, spec: ModelSpec, precision: Precision, backend: Backend,
                 source: WeightSource, ctx: RunContext, working_bytes: int):
        self.m, self.spec, self.precision, self.backend_kind = manager, spec, precision, backend
        self.source, self.ctx, self.working = source, ctx, working_bytes
        self.stages = stages(spec)
        self.finished: set[ComponentKey] = set()
        self.load_ms = 0.0
        self.runs_as: str | None = None
        self._dtypes: dict[str, torch.dtype | None] = {}

    def key(self, name: str) -> ComponentKey:
        # Tokenizers and schedulers are the same object for every backend.
        backend = "any" if name in LIGHT_PARTS else self.backend_kind.value
        return component_key(self.spec, name, self.precision, backend, **self.m.dtype_policy)

    def get(self, name: str) -> Any:
        index = next(i for i, stage in enumerate(self.stages) if name in stage)
        protect = {self.key(n) for n in self.stages[index]}
        later = {self.key(n) for stage in self.stages[index + 1:] for n in stage}
        backend = self.m._backend(Backend.TORCH if name in LIGHT_PARTS else self.backend_kind)
        component = self.m.residency.acquire(
            self.key(name), self.m._component_bytes(self.spec, name, self.precision, self.backend_kind),
            lambda: self._load(name), working_bytes=self.working, protect=protect, finished=self.finished, later=later,
            load_peak_bytes=backend.load_peak_bytes(self.spec, name, self.precision, self.m._bf16_ok, self.m.device,
                                                    self.source))
        self._dtypes[name] = component.dtype
        if name == self.spec.denoiser:
            self.runs_as = component.runs_as
        return component.obj

    def _load(self, name: str) -> LoadedComponent:
        started = time.perf_counter()
        if name not in LIGHT_PARTS:
            self.ctx.report("load", 0, 1, f"loading {self.spec.id} {name} ({self.precision.value})")
        backend = self.m._backend(Backend.TORCH if name in LIGHT_PARTS else self.backend_kind)
        component = backend.load(self.spec, name, self.precision, self.m.device, self.m.info.capability, self.source,
                                  self.ctx)
        component.key = self.key(name)
        self.load_ms += (time.perf_counter() - started) * 1000
        return component

    def dtype(self, name: str) -> torch.dtype:
        if self._dtypes.get(name) is not None:
            return self._dtypes[name]
        return component_dtype(self.spec, name, self.precision, **self.m.dtype_policy)

    def done_with(self, *names: str) -> None:
        self.finished |= {self.key(n) for n in names}


def default_budget(info: DeviceInfo) -> int:
    """Most of the device's memory: 90% of a discrete GPU, 80% of what unified/CPU memory has available now."""
    if info.unified:
        return int(info.free_bytes * 0.8)
    return int(info.total_bytes * 0.9)


def _is_user_facing(exc: BaseException) -> bool:
    from .loading import ModelAccessError
    from .sampling import NumericsError

    return isinstance(exc, (ModelAccessError, NumericsError, RequestError, InsufficientMemoryError, QueueFullError))
