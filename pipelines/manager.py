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
import traceback
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Callable

import torch

from . import memory_plan
from .backends import BackendChoice, TensorRTStatus, choose_backend, tensorrt_status
from .backends.contract import ComponentBackend, TensorRTFailure, TensorRTOptions, TorchOptions
from .backends.torch_backend import TorchBackend
from .components import ComponentKey, component_key, estimate_bytes
from .device_policy import LIGHT_PARTS, DevicePolicy
from .engine_cache import DEFAULT_CACHE_DIR, EngineCache
from .families import family_of
from .families.family import part_owner
from .job_parts import JobParts
from .prompt_cache import DEFAULT_ENTRIES, PromptCache
from .cpu_math import CpuMath
from .gpu import DeviceInfo, parse_memory, probe_device, resolve_device, system_memory
from .loading import HubOptions, WeightSource, check_access
from .lora import DEFAULT_LORA_DIR, LoraLibrary, LoraSet, load_set
from .precision import Backend, Precision
from .registry import ModelSpec, UnknownModelError, refiner_of, resolve_spec
from .request import GenerationRequest, GenerationResult, RequestError, resolve_request
from .residency import InsufficientMemoryError, Residency
from .run_context import JobCancelled, Progress, RunContext
from .vocabulary import completed_note, completed_prompt, vocabulary_note

log = logging.getLogger("prism.manager")


class QueueFullError(RuntimeError):
    """The queue is at its limit; the caller should try again shortly."""


class ModelInUseError(RequestError):
    """An unload asked for the model the running job uses."""


@dataclass(frozen=True)
class ManagerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backend: str = "auto"  # auto | torch | tensorrt
    memory_budget: str | None = None  # "40GB", "512MB" or a fraction of device memory; None: most of it
    random_weights: bool = False  # Hub models get their architecture with random weights (benchmarks)
    hub: HubOptions = HubOptions()
    max_queue: int = 4  # waiting jobs; one more is refused at once (0: none wait, one job runs at a time)
    # Built engines and compiled kernels (its torch-inductor/ folder); pipelines.config sets it from the
    # flags, where PRISM_ENGINE_CACHE is read as the default.
    engine_cache_dir: Path = DEFAULT_CACHE_DIR
    min_working_bytes: int = 512 * 2**20  # kept free beyond the weights even for tiny images
    torch: TorchOptions = TorchOptions()  # compile (None: on CUDA GPUs); the manager fills in staging and the compile cache
    tensorrt: TensorRTOptions = TensorRTOptions()  # CUDA graphs, weight streaming, engine size ranges
    cpu_math: CpuMath | None = None  # on a CPU: what it computes fast; None measures it (tests pass one)
    lora_dir: Path = DEFAULT_LORA_DIR  # LoRAs offered by name (--lora-dir)
    # Requests may name a LoRA by file path too (the CLI's --lora PATH); never for web requests, which would
    # otherwise read any .safetensors file on the server.
    lora_paths: bool = False
    # Prompt encodings kept for repeats (pipelines/prompt_cache.py); 0 encodes every job's prompt (the bench).
    prompt_cache_entries: int = DEFAULT_ENTRIES
    # Denoising steps the host queues ahead of the GPU's progress (run_context.StepReports); 0 waits for each.
    steps_ahead: int = 1


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
    lora_host_bytes: int  # 16-bit bases kept in host RAM so LoRAs can be switched without reloading
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
                 backends: dict[Backend, ComponentBackend] | None = None):
        self.config = config
        self.device = device_info.device if device_info else resolve_device(config.device)
        self.info = device_info or probe_device(self.device)
        if config.cpu_math is not None and not self.info.is_cuda:
            self.info = replace(self.info, cpu_math=config.cpu_math)
        # What decides each component's dtype here (with the bf16 VAE lever: PyTorch loads only, see DevicePolicy).
        self.policy = replace(DevicePolicy.for_info(self.info), bf16_vae=config.torch.bf16_vae)
        budget = (parse_memory(config.memory_budget, self.info.total_bytes) if config.memory_budget
                  else default_budget(self.info))
        _, host_free = system_memory()
        discrete = self.info.is_cuda and not self.info.unified
        self.residency = Residency(budget, self.device, can_park=discrete, park_budget_bytes=int(host_free * 0.5),
                                   host_is_device=not discrete)
        self.lora_library = LoraLibrary(config.lora_dir, allow_paths=config.lora_paths)
        self.engine_cache = EngineCache(config.engine_cache_dir)
        self.prompts = PromptCache(config.prompt_cache_entries)
        self._backends: dict[Backend, ComponentBackend] = dict(backends or {})
        self._backends.setdefault(Backend.TORCH, TorchBackend(replace(
            config.torch, stage_on_host=self.info.is_cuda and not self.info.unified,
            # torch.compile by default on CUDA GPUs (compiled FP8 is what beats 16-bit: H200 106.8 vs 176.9
            # ms a Flux step); a CPU stays eager unless it is asked for.
            compile=self.info.is_cuda if config.torch.compile is None else config.torch.compile,
            cuda_graphs=config.torch.cuda_graphs and self.info.is_cuda,  # inductor records none on a CPU
            compile_cache_dir=self.engine_cache.root / "torch-inductor")))
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._running: Job | None = None
        self._lock = threading.Lock()
        # (model, precision) -> why its TensorRT engine failed; read and written by the worker thread only.
        self._tensorrt_failures: dict[tuple[str, str], str] = {}
        self._ids = itertools.count(1)
        # Called on the worker thread with each finished job (the HTTP API's metrics count the UI's jobs too).
        self.job_observers: list[Callable[[Job], None]] = []
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

    @property
    def worker_alive(self) -> bool:
        return self._worker.is_alive()

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
                for observe in self.job_observers:
                    try:
                        observe(job)
                    except Exception:  # an observer must never stop the worker
                        log.exception("job observer failed")
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
        try:
            refiner = refiner_of(spec) if resolved.refiner is not None else None
        except UnknownModelError as exc:
            raise RequestError(str(exc)) from None
        if resolved.image is not None and family_of(spec).first_step(resolved.steps, resolved.strength) >= resolved.steps:
            raise RequestError(f"strength {resolved.strength:g} with {resolved.steps} steps leaves no step to run; "
                               "raise the strength or the steps.")
        loras = load_set(resolved.loras, spec, self.lora_library)  # files read and checked before model work
        resolved = replace(resolved, loras=tuple((a.file.name, a.scale) for a in loras.items))  # names, never paths
        source = WeightSource(random_weights=self.config.random_weights and spec.local_dir is None, hub=self.config.hub)
        check_access(spec, source)
        if refiner is not None:
            check_access(refiner, source)
        working = self.working_bytes(spec, resolved)
        self.check_fits(spec, precision, choice.backend, working, source, with_refiner=refiner is not None)
        ctx = RunContext(torch.device(self.device), on_progress=job.report, cancel=job.cancel_event,
                         steps_ahead=self.config.steps_ahead)
        with ctx.active():
            if choice.backend is Backend.TENSORRT and (spec.id, precision.value) in self._tensorrt_failures:
                reason = self._tensorrt_failures[(spec.id, precision.value)]
                return self._on_torch_instead(spec, resolved, source, ctx, f"TensorRT failed earlier ({reason})", loras)
            try:
                return self._generate_or_retry(spec, resolved, choice, source, ctx, working, loras)
            except TensorRTFailure as exc:
                log.warning("%s; rerunning on PyTorch", exc)
                # Remembered for the job's model too: a failing refiner engine sends its base's jobs to PyTorch.
                for engine in {exc.engine, (spec.id, exc.precision)}:
                    self._tensorrt_failures[engine] = f"{exc.stage}: {exc.reason}"
                    self.residency.drop_backend(engine[0], Backend.TENSORRT.value, "TensorRT failed")
                return self._on_torch_instead(spec, resolved, source, ctx, f"TensorRT failed ({exc.stage}: {exc.reason})",
                                              loras)

    def _on_torch_instead(self, spec: ModelSpec, req: GenerationRequest, source: WeightSource, ctx: RunContext,
                          why: str, loras: LoraSet) -> GenerationResult:
        """The job again on PyTorch at the same precision, saying why; until the engine cache is cleared or the
        app restarts, this model and precision go straight to PyTorch (no rebuild in a loop)."""
        precision = Precision.parse(req.precision)
        if not self.policy.support(precision, Backend.TORCH).runnable:
            raise RequestError(f"{why}, and PyTorch cannot run {precision.value} here either: "
                               f"{self.policy.support(precision, Backend.TORCH).reason}")
        ctx.warn(f"{why}; ran on PyTorch.")
        working = self.working_bytes(spec, req)
        self.check_fits(spec, precision, Backend.TORCH, working, source, with_refiner=req.refiner is not None)
        choice = BackendChoice(Backend.TORCH, why)
        return self._generate_or_retry(spec, replace(req, backend=Backend.TORCH.value), choice, source, ctx, working,
                                       loras)

    def forget_tensorrt_failures(self) -> None:
        """Give failed engines another try (after the engine cache is cleared)."""
        self._tensorrt_failures.clear()

    def _generate_or_retry(self, spec: ModelSpec, resolved: GenerationRequest, choice: BackendChoice,
                           source: WeightSource, ctx: RunContext, working: int, loras: LoraSet) -> GenerationResult:
        precision = Precision.parse(resolved.precision)
        try:
            return self._generate(spec, resolved, choice, source, ctx, working, loras)
        except torch.OutOfMemoryError:
            # One retry with nothing else resident; the estimate or another process may have been off.
            self.residency.evict_all("out of memory: retrying once with nothing else loaded")
            try:
                return self._generate(spec, resolved, choice, source, ctx, working, loras)
            except torch.OutOfMemoryError:
                self.residency.evict_all("out of memory twice")
                hint = self._smaller_precision_hint(spec, precision, choice.backend, working, source,
                                                    resolved.refiner is not None)
                raise InsufficientMemoryError(
                    f"Out of GPU memory running {spec.id} at {precision.value} {resolved.width}x{resolved.height} "
                    f"x{resolved.num_images}, even with every other model unloaded. "
                    f"{hint}") from None

    def _generate(self, spec: ModelSpec, req: GenerationRequest, choice: BackendChoice, source: WeightSource,
                  ctx: RunContext, working: int, loras: LoraSet) -> GenerationResult:
        given, drawn = req.prompt, completed_prompt(spec, req.prompt)
        req = replace(req, prompt=drawn) if drawn else req
        parts = JobParts(self, spec, Precision.parse(req.precision), choice.backend, source, ctx, working, loras,
                         with_image=req.image is not None, with_refiner=req.refiner is not None)
        if self.info.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        out = family_of(spec).generate(spec, parts, req, ctx)
        peak = torch.cuda.max_memory_allocated(self.device) if self.info.is_cuda else None
        backend = self.backend(choice.backend)
        notes = tuple(f"Input image: {note}." for note in req.image.notes) if req.image is not None else ()
        notes += (completed_note(spec, given, drawn),) if drawn else ()
        unknown_words = vocabulary_note(spec, req.prompt)
        notes += (unknown_words,) if unknown_words else ()
        forced = (choice.reason,) if choice.backend is Backend.TORCH and req.backend == "tensorrt" else ()
        warnings = notes + out.warnings + forced + tuple(ctx.warnings)
        return GenerationResult(
            request=req, model_id=spec.id, images=out.images, seeds=tuple(req.seed + i for i in range(req.num_images)),
            timings=replace(out.timings, load_ms=parts.load_ms), peak_memory_bytes=peak,
            backend=backend.describe(), runs_as=parts.runs_as or Precision.parse(req.precision).label,
            device=self.info.name, warnings=warnings, lora_hashes=loras.hashes(),
            refiner_id=parts.refiner.id if parts.refiner is not None else "")

    # ------------------------------------------------------------------ memory planning (pipelines.memory_plan)

    def working_bytes(self, spec: ModelSpec, req: GenerationRequest) -> int:
        return memory_plan.working_bytes(spec, req, self.policy, self.config.min_working_bytes)

    def component_bytes(self, spec: ModelSpec, name: str, precision: Precision, backend: Backend) -> int:
        if name in LIGHT_PARTS:
            return 0
        key = component_key(spec, name, precision, backend.value, self.policy)
        entry = self.residency.entries.get(key)
        return entry.component.nbytes if entry else estimate_bytes(spec, name, precision, self.policy)

    def stage_bytes(self, spec: ModelSpec, precision: Precision, backend: Backend) -> list[tuple[tuple[str, ...], int]]:
        return [(stage, sum(self.component_bytes(spec, n, precision, backend) for n in stage))
                for stage in family_of(spec).stages()]

    def stage_needs(self, spec: ModelSpec, precision: Precision, backend: Backend, working: int,
                    source: WeightSource = WeightSource(), with_image: bool = False,
                    with_refiner: bool = False) -> list[tuple[tuple[str, ...], int]]:
        """Per stage, the most memory it holds at once: its weights plus working memory, or a load's peak. With a
        refiner its denoiser is a stage of its own: the base's may be evicted for it on a tight budget."""
        stages = family_of(spec).stages(with_image, with_refiner)
        refiner = refiner_of(spec) if with_refiner else None
        owners = {n: part_owner(spec, n, refiner) for stage in stages for n in stage}
        weights = {n: self.component_bytes(*owner, precision, backend) for n, owner in owners.items()}
        peaks = {n: self._load_peak(*owner, precision, backend, source) for n, owner in owners.items()
                 if owner[1] not in LIGHT_PARTS}
        return memory_plan.stage_needs(stages, weights, peaks, working)

    def _load_peak(self, spec: ModelSpec, name: str, precision: Precision, backend: Backend, source: WeightSource) -> int:
        key = component_key(spec, name, precision, backend.value, self.policy)
        if key in self.residency.entries:
            return 0  # already loaded (or parked): no load peak
        return self.backend(backend).load_peak_bytes(spec, name, precision, self.device, self.policy, source)

    def check_fits(self, spec: ModelSpec, precision: Precision, backend: Backend, working: int,
                   source: WeightSource = WeightSource(), with_refiner: bool = False) -> None:
        """Raise InsufficientMemoryError (needed, free, and a smaller precision that fits) before loading anything."""
        budget = self.residency.budget_bytes
        needs = self.stage_needs(spec, precision, backend, working, source, with_refiner=with_refiner)
        problem = memory_plan.refusal(spec, precision, needs, working, budget, self.residency.used_bytes())
        if problem:
            hint = self._smaller_precision_hint(spec, precision, backend, working, source, with_refiner)
            raise InsufficientMemoryError(f"{problem} {hint}")

    def _smaller_precision_hint(self, spec: ModelSpec, precision: Precision, backend: Backend, working: int,
                                source: WeightSource = WeightSource(), with_refiner: bool = False) -> str:
        def need_of(candidate: Precision) -> int | None:
            if not self.policy.support(candidate, backend).runnable:
                return None
            return max(n for _, n in self.stage_needs(spec, candidate, backend, working, source,
                                                       with_refiner=with_refiner))

        return memory_plan.smaller_precision_hint(precision, self.residency.budget_bytes, need_of)

    # ------------------------------------------------------------------ backends, status, unloading

    def backend(self, kind: Backend) -> ComponentBackend:
        if kind not in self._backends:
            from .backends.tensorrt.backend import TensorRTBackend  # heavy, optional: only when chosen

            self._backends[kind] = TensorRTBackend(self.engine_cache, self.config.tensorrt)
        return self._backends[kind]

    def status(self) -> ManagerStatus:
        with self._lock:
            queued, running = len(self._waiting), (self._running.request if self._running else None)
        trt = tensorrt_status(self.info.capability)
        choice = choose_backend(self.config.backend if self.config.backend != "tensorrt" else "auto",
                                self.info.capability, Precision.BF16)
        snap = self.residency.snapshot()
        resident = tuple(ResidentInfo(r.key, r.component.nbytes, r.parked) for r in snap.resident)
        return ManagerStatus(self.info, self.residency.budget_bytes, snap.used_bytes, snap.parked_bytes,
                             self.residency.host_bytes(), resident,
                             queued, running, trt, choice.reason, self.engine_cache.root,
                             self.engine_cache.total_bytes(), tuple(str(e) for e in snap.events))

    def unload(self, model: str | None = None, *, spare_running: bool = False) -> int:
        """Unload one model (or all); returns bytes released. With `spare_running`, refuse (ModelInUseError)
        when the running job uses it: checked and done under the lock the worker takes to start a job, so
        no job can start on the model in between."""
        with self._lock:
            if spare_running and self._running is not None and model in (None, self._running_model()):
                raise ModelInUseError(f"A job is running on {self._running_model()}; unload it when the job has finished.")
            self.prompts.clear()  # device memory too, and what a user unloads should not linger
            if model is None:
                return self.residency.evict_all("unloaded by the user")
            return self.residency.drop_model(model)

    def _running_model(self) -> str | None:
        """The model id the running job uses (residency keys name models by id)."""
        try:
            return resolve_spec(self._running.request.model).id if self._running else None
        except UnknownModelError:
            return None


def default_budget(info: DeviceInfo) -> int:
    """Most of the device's memory: 90% of a discrete GPU, 80% of what unified/CPU memory has available now."""
    if info.unified:
        return int(info.free_bytes * 0.8)
    return int(info.total_bytes * 0.9)


def _is_user_facing(exc: BaseException) -> bool:
    from .loading import ModelAccessError
    from .sampling import NumericsError

    return isinstance(exc, (ModelAccessError, NumericsError, RequestError, InsufficientMemoryError, QueueFullError))
