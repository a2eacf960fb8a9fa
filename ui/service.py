"""The UI's one door into Prism: widget values become GenerationRequests for the PipelineManager, and
results become files and text. No model logic lives here; the manager validates, loads and runs.

Only the models offered at startup can be asked for, by name: a request never names a path, so a
browser cannot make the server read an arbitrary folder.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pipelines.backends import choose_backend
from pipelines.compare import Comparison, run_comparison
from pipelines.families import FAMILIES
from pipelines.families.family import ImageUse
from pipelines.loading import HubOptions, ModelAccessError, default_model, is_available_locally
from pipelines.manager import ModelInUseError
from pipelines.pngmeta import png_bytes, save_png
from pipelines.schedulers import recorded_name
from pipelines.precision import Backend, Precision, PrecisionSupport
from pipelines.registry import HUB_MODELS, Family, ModelSpec, UnknownModelError, demo_specs, read_local_spec
from pipelines.request import DEFAULT_MASK_BLUR, GenerationRequest, GenerationResult, RequestError, resolve_request
from pipelines.errors import user_message
from pipelines.gpu import system_memory
from pipelines.image_input import random_image

from .errors import OutputError
from .formatting import progress_text
from .history import DEFAULT_OUTPUTS_MAX_BYTES, prune_outputs

log = logging.getLogger("prism.ui")

PRECISION_ORDER = (Precision.BF16, Precision.FP16, Precision.FP8, Precision.FP4)


@dataclass(frozen=True)
class ModelChoice:
    """A model offered in the UI. `name` is what the browser and API see; `model` what the manager loads."""

    name: str
    model: str  # a registry id, or the path of a local folder in the Hugging Face layout
    spec: ModelSpec

    @property
    def family(self) -> Family:
        return self.spec.family


def offered_models(models: Sequence[str] | None = None) -> tuple[ModelChoice, ...]:
    """The models to offer: `models` (registry ids or local folders, the latter under their folder name),
    or by default every Hub model plus the embedded demo models that are present."""
    if not models:
        return tuple(ModelChoice(s.id, s.id, s) for s in demo_specs() + HUB_MODELS)
    known = {s.id: s for s in HUB_MODELS + demo_specs()}
    out: dict[str, ModelChoice] = {}
    for item in models:
        if item in known:
            choice = ModelChoice(item, item, known[item])
        else:
            folder = Path(item).expanduser()
            if not folder.is_dir():
                raise UnknownModelError(f"--models: {item!r} is neither a known model ({', '.join(known)}) "
                                        "nor a folder in the Hugging Face pipeline layout.")
            folder = folder.resolve()
            spec = read_local_spec(folder)
            if spec.is_refiner:
                raise UnknownModelError(f"--models: {item!r} is a refiner; offer its base model (the refiner is a "
                                        "switch on the base's tab when the base's prism.json names it).")
            choice = ModelChoice(spec.id, str(folder), spec)
        if choice.name in out:
            raise UnknownModelError(f"--models: two models are named {choice.name!r}; rename one of the folders.")
        out[choice.name] = choice
    return tuple(out.values())


@dataclass(frozen=True)
class MemoryView:
    used_bytes: int
    total_bytes: int
    kind: str  # what the figures are: GPU memory, unified memory, system RAM


class Task:
    """Work for one UI request, run on its own thread so the UI thread can poll it for progress.

    The manager reports progress from its worker thread; polling `view()` from the request's thread
    keeps Gradio's progress calls on the thread Gradio expects.
    """

    def __init__(self, manager: Any, work: Callable[["Task"], Any]):
        self._manager = manager
        self.job: Any = None
        self.label = ""
        self.cancel_event = threading.Event()
        self._finished = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(work,), name="prism-ui-task", daemon=True).start()

    def _run(self, work: Callable[["Task"], Any]) -> None:
        try:
            self._value = work(self)
        except BaseException as exc:  # handed to the UI thread by `result()`
            self._error = exc
        finally:
            self._finished.set()

    def track(self, job: Any) -> None:
        self.job = job
        if self.cancel_event.is_set():
            job.cancel()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def view(self) -> tuple[str, float]:
        job = self.job
        if job is None:
            return progress_text(None, 0, self.label)
        return progress_text(job.progress, self._manager.queue_position(job), self.label)

    def views(self, poll_s: float = 0.2) -> Iterator[tuple[str, float]]:
        """Each change of (text, fraction) until the work is finished."""
        last = None
        while not self._finished.is_set():
            view = self.view()
            if view != last:
                yield view
                last = view
            self._finished.wait(poll_s)

    def result(self, timeout: float | None = None) -> Any:
        if not self._finished.wait(timeout):
            raise TimeoutError("The task did not finish in time.")
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> None:
        self.cancel_event.set()
        if self.job is not None:
            self.job.cancel()


class PrismService:
    """What the UI may do: list models and their defaults, generate, compare, report and unload."""

    def __init__(self, manager: Any, models: Sequence[ModelChoice] | None = None, output_dir: Path | None = None,
                 hub: HubOptions = HubOptions(), outputs_max_bytes: int = DEFAULT_OUTPUTS_MAX_BYTES):
        self.manager = manager
        self.models = tuple(models) if models is not None else offered_models()
        self.hub = hub
        self.outputs_max_bytes = outputs_max_bytes  # the outputs folder's size cap; oldest batches go first
        self._own_output_dir = output_dir is None  # a temporary folder of ours, removed by `close`
        self.output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="prism-outputs-"))
        self._by_name = {c.name: c for c in self.models}
        self._save_lock = threading.Lock()
        self._sessions: dict[str, Task] = {}  # each browser session's latest task, for its Stop button
        self._sessions_lock = threading.Lock()

    def close(self) -> None:
        """Stop the manager's worker and remove our temporary PNG folder (Gradio serves its own copies)."""
        self.manager.close()
        if self._own_output_dir:
            shutil.rmtree(self.output_dir, ignore_errors=True)

    # ------------------------------------------------------------------ models

    @property
    def capability(self) -> tuple[int, int] | None:
        return self.manager.info.capability

    def choices(self, family: Family | None = None) -> list[ModelChoice]:
        return [c for c in self.models if family is None or c.family is family]

    def choice(self, name: str, family: Family | None = None) -> ModelChoice:
        offered = self.choices(family)
        for c in offered:
            if c.name == name:
                return c
        what = f"{family.value.upper()} model" if family else "model"
        if not offered:
            raise RequestError(f"No {what} is offered by this server; start it with --models and a {what}.")
        raise RequestError(f"Unknown {what} {name!r}; choose one of: {', '.join(c.name for c in offered)}.")

    def default_choice(self, family: Family) -> tuple[ModelChoice | None, str]:
        """(model to preselect, note to show): `default_model`'s pick when it is offered, else the first offered
        (ungated first)."""
        offered = self.choices(family)
        if not offered:
            return None, f"No {family.value.upper()} model is offered; start the app with --models naming one."
        try:
            model_id, note = default_model(family, self.hub)
        except ModelAccessError:
            model_id, note = None, ""
        if model_id in self._by_name and self._by_name[model_id].family is family:
            return self._by_name[model_id], note
        # Nothing here yet: an ungated model first, whose download needs no Hugging Face token.
        first = min(offered, key=lambda c: c.spec.gated)
        return first, self.model_note(first)

    def default_model(self) -> ModelChoice | None:
        """The model for a request that names none (the HTTP API), and the one /health vouches for: the Flux
        tab's preselection, else the SDXL tab's."""
        for family in Family:
            choice, _ = self.default_choice(family)
            if choice is not None:
                return choice
        return None

    def model_note(self, choice: ModelChoice) -> str:
        spec = choice.spec
        if spec.local_dir is not None:
            return spec.description  # names the folder
        if is_available_locally(spec, self.hub):
            where = "Weights are in the local Hugging Face cache."
        elif self.hub.is_offline:
            where = "Not downloaded, and offline mode is on: choose another model or download it elsewhere."
        else:
            where = ("Not downloaded yet: the first request downloads it"
                     + (" (gated: accept its license on Hugging Face and set HF_TOKEN)." if spec.gated else "."))
        return f"{spec.description} {where}"

    # ------------------------------------------------------------------ precisions

    def backend_for(self, precision: Precision) -> Backend:
        configured = self.manager.config.backend
        try:
            return choose_backend(configured, self.capability, precision).backend
        except ValueError:  # forced TensorRT that cannot run here: the request will say so
            return Backend.TENSORRT if configured == "tensorrt" else Backend.TORCH

    def support(self, precision: Precision) -> PrecisionSupport:
        return self.manager.policy.support(precision, self.backend_for(precision))

    def default_precision(self) -> Precision:
        return next((p for p in PRECISION_ORDER if self.support(p).runnable), Precision.FP16)

    # ------------------------------------------------------------------ requests

    def build_request(self, family: Family | None, model: str, prompt: str, negative_prompt: str | None,
                      width: Any, height: Any, steps: Any, guidance: Any, seed: Any, num_images: Any,
                      precision: str, sampler: str | None = "", image: Any = None, strength: Any = None,
                      mask: Any = None, mask_blur: Any = DEFAULT_MASK_BLUR, only_masked: bool = False,
                      loras: tuple = (), refiner: Any = None, cache: Any = "off") -> GenerationRequest:
        """A request from widget values (None or -1 seed: random; empty size/steps/guidance: the model's default).
        `image` and `mask` are decoded images or files; `resolve_request` reads and checks them. `refiner`: the
        hand-off fraction when the refiner is on, else None."""
        choice = self.choice(model, family)
        seed = None if seed in (None, "", -1, -1.0) else seed
        return GenerationRequest(
            prompt=prompt or "", model=choice.model, precision=precision or self.default_precision().value,
            negative_prompt=negative_prompt or "", width=_blank_none(width), height=_blank_none(height),
            steps=_blank_none(steps), guidance=_blank_none(guidance), seed=seed,
            num_images=1 if num_images in (None, "") else num_images, sampler=sampler or "", image=image,
            strength=self.strength_for(choice, image, strength), mask=mask,
            mask_blur=DEFAULT_MASK_BLUR if mask_blur in (None, "") else mask_blur, only_masked=bool(only_masked),
            loras=tuple(loras), refiner=_blank_none(refiner), cache=cache)

    def strength_for(self, choice: ModelChoice, image: Any, strength: Any) -> Any:
        """The strength a request carries: an image-to-image input's; none without an image, nor for a model
        that edits its input (it runs every step: the widget's value is not its to take)."""
        if image is None or FAMILIES[choice.family].image_use is ImageUse.CONTEXT:
            return None
        return _blank_none(strength)

    def edit_choices(self) -> list[ModelChoice]:
        """The offered models that edit an input image by instruction (the Edit tab's)."""
        return [c for c in self.models if FAMILIES[c.family].image_use is ImageUse.CONTEXT]

    def lora_names(self) -> list[str]:
        """The LoRAs in the manager's loras/ folder, by name."""
        return self.manager.lora_library.names()

    def check(self, request: GenerationRequest) -> GenerationRequest:
        """Validate now (the manager validates again) so a bad field is reported without queueing."""
        choice = self.choice_for(request)
        try:
            precision = Precision.parse(request.precision)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        return resolve_request(request, choice.spec, self.capability, self.backend_for(precision))

    def start_generate(self, request: GenerationRequest, session: str | None = None) -> Task:
        self.check(request)

        def work(task: Task) -> GenerationResult:
            job = self.manager.submit(request)
            task.track(job)
            return job.result()

        return self._remember(session, Task(self.manager, work))

    def _remember(self, session: str | None, task: Task) -> Task:
        if session:
            with self._sessions_lock:
                for key in [k for k, t in self._sessions.items() if t.finished]:
                    del self._sessions[key]  # forget finished work so the map stays small
                self._sessions[session] = task
        return task

    def cancel_session(self, session: str | None) -> str | None:
        """Cancel the session's unfinished task; the stage its job was in ("queue" before it has one), or None
        when there was nothing to cancel."""
        with self._sessions_lock:
            task = self._sessions.get(session) if session else None
        if task is None or task.finished:
            return None
        progress = task.job.progress if task.job is not None else None
        task.cancel()
        return progress.stage if progress is not None else "queue"

    def start_compare(self, request: GenerationRequest, precisions: Sequence[str], session: str | None = None) -> Task:
        def work(task: Task) -> Comparison:
            def on_progress(precision: Precision, index: int, count: int, _progress: Any) -> None:
                task.label = f"{precision.label} ({index + 1}/{count})"

            return run_comparison(self.manager, request, precisions, on_progress=on_progress, on_job=task.track,
                                  cancel=task.cancel_event)

        return self._remember(session, Task(self.manager, work))

    # ------------------------------------------------------------------ files

    def _new_batch_dir(self) -> Path:
        with self._save_lock:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            prune_outputs(self.output_dir, self.outputs_max_bytes)
            folder = self.output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            folder.mkdir()
            return folder

    def choice_for(self, request: GenerationRequest) -> ModelChoice:
        """The offered model a request names (by what the manager loads, or by its name)."""
        for c in self.models:
            if request.model in (c.model, c.name):
                return c
        raise RequestError(f"Model {request.model!r} is not offered here.")

    def _png_naming(self, result: GenerationResult) -> tuple[str, str, str]:
        """(offered model name, precision, A1111 sampler name) for a result's PNGs."""
        choice = self.choice_for(result.request)
        scheduler = choice.spec.components.get("scheduler")
        sampler = recorded_name(result.request.sampler, scheduler.class_name if scheduler else "")
        precision = Precision.parse(result.request.precision).value
        # The offered name, not the request's model string: that may be a folder path.
        return choice.name, precision, sampler

    def save_result(self, result: GenerationResult, folder: Path | None = None) -> list[Path]:
        """PNG files with the A1111 `parameters` and Prism JSON chunks, one per image. Raises OutputError
        (whose message names no server path; the log line does) when they cannot be written."""
        try:
            return self._save_result(result, folder)
        except OSError as exc:
            log.warning("cannot write results to %s: %s", self.output_dir, exc)
            reason = exc.strerror or "write failed"
            raise OutputError(f"The images were made but could not be saved on the server ({reason.lower()}); "
                              "tell whoever runs it to check the output folder.") from None

    def _save_result(self, result: GenerationResult, folder: Path | None = None) -> list[Path]:
        folder = folder or self._new_batch_dir()
        name, precision, sampler = self._png_naming(result)
        return [save_png(folder / f"{name}-{seed}-{precision}.png", image, result.settings(), seed, sampler)
                for image, seed in zip(result.images, result.seeds)]

    def result_pngs(self, result: GenerationResult) -> list[bytes]:
        """The same PNGs as `save_result`, as bytes (for the HTTP API), one per image."""
        _, _, sampler = self._png_naming(result)
        return [png_bytes(image, result.settings(), seed, sampler) for image, seed in zip(result.images, result.seeds)]

    def save_comparison(self, comparison: Comparison) -> dict[str, Path]:
        """Each image's PNG by its column (a precision's value, or "cached")."""
        try:
            folder = self._new_batch_dir()
        except OSError as exc:
            log.warning("cannot write results to %s: %s", self.output_dir, exc)
            raise OutputError("The images were made but could not be saved on the server; tell whoever runs it "
                              "to check the output folder.") from None
        return {e.column: self.save_result(e.result, folder)[0] for e in comparison.entries if e.result is not None}

    # ------------------------------------------------------------------ system

    def memory(self) -> MemoryView:
        info = self.manager.info
        if info.device == "cluster":  # Ray Serve: the devices are the replicas', none is in this process
            status = self.manager.status()
            return MemoryView(status.memory_used_bytes, status.memory_total_bytes,
                              f"device memory of {len(status.replicas)} Ray Serve replica(s)")
        if info.is_cuda and not info.unified:
            import torch

            free, total = torch.cuda.mem_get_info(info.device)
            return MemoryView(total - free, total, "GPU memory")
        total, available = system_memory()
        kind = "unified memory, shared by the CPU and GPU" if info.is_cuda else "system RAM; no GPU, running on the CPU"
        return MemoryView(total - available, total, kind)

    def warm_up(self, names: Sequence[str], log: Callable[[str], None]) -> threading.Thread:
        """Load each model and draw one throwaway step at its default size and this machine's default precision
        (an edit model edits a random picture), in the background, so that the first real image skips loading and
        compiling; a job sent meanwhile waits behind it in the queue. No names: the model a request naming none
        gets. An unknown name raises RequestError at once; a warm-up that fails says so in one line (`log`) and
        the app serves on."""
        choices = [self.choice(name) for name in names] if names else [c for c in (self.default_model(),) if c]

        def warm() -> None:
            for choice in choices:
                spec, started = choice.spec, time.perf_counter()
                context = FAMILIES[spec.family].image_use is ImageUse.CONTEXT
                image = random_image(spec.default_width, spec.default_height) if context else None
                request = GenerationRequest(prompt="warm-up", model=choice.model, steps=1, seed=0, image=image,
                                            precision=self.default_precision().value)
                try:
                    result = self.manager.generate(request)
                except Exception as exc:  # noqa: BLE001 - any failure: one line, and the app serves on
                    message = user_message(exc) or type(exc).__name__
                    log(f"Warm-up of {choice.name} did not finish: {message} Its first image will load it instead.")
                    continue
                width, height = result.images[0].size
                log(f"Warm-up: {choice.name} is loaded and ready at {width}x{height} ({result.runs_as}) after "
                    f"{time.perf_counter() - started:.1f} s.")

        thread = threading.Thread(target=warm, name="prism-warm-up", daemon=True)
        thread.start()
        return thread

    def status(self) -> Any:
        return self.manager.status()

    def running_name(self) -> str | None:
        """The offered name of the model the running job uses (its request may name a folder path)."""
        running = self.manager.status().running
        if running is None:
            return None
        try:
            return self.choice_for(running).name
        except RequestError:
            return str(running.model)

    def unload(self, model: str | None) -> int:
        """Bytes released. Refused for the model a job is running on: its components are in use."""
        try:
            return self.manager.unload(model or None, spare_running=True)
        except ModelInUseError:
            raise RequestError(f"A job is running on {self.running_name() or model}; "
                               "unload it when the job has finished.") from None

    def self_check(self, on_check: Callable[[Any], None] | None = None) -> tuple[Any, Path]:
        """`python -m pipelines doctor` from the System tab: the report, and its JSON in the output folder (to
        download and attach to a bug report). It renders the tiny demo model through managers of its own on
        this machine's device, so the models this app has loaded stay loaded."""
        from pipelines.doctor import run_doctor, write_report

        device = self.manager.info.device
        report = run_doctor("auto" if device == "cluster" else device, on_check=on_check)
        return report, write_report(report, self.output_dir / "prism-doctor.json")

    def clear_engine_cache(self) -> tuple[int, int]:
        """(artifacts removed, bytes freed). Refused while jobs run: a build may be writing into the cache."""
        status = self.manager.status()
        if status.running is not None or status.queued:
            raise RequestError("Jobs are running or queued; clear the engine cache when they have finished.")
        cache = self.manager.engine_cache
        before = cache.total_bytes()
        removed = cache.clear()
        self.manager.forget_tensorrt_failures()  # rebuilt engines get another try
        return removed, before


def _blank_none(value: Any) -> Any:
    return None if value in (None, "") else value
