"""One prompt and seed at several precisions, and how far each lands from the 16-bit image.

The runs go through the PipelineManager one after another, 16-bit first, with the same resolved
request apart from the precision, so the only thing that differs between the images is the
precision. Text encoders and the VAE stay 16-bit at every precision (see `components.py`), and the
16-bit reference is the dtype FP8/FP4 compute in, so PSNR/SSIM measure the denoiser's quantization.

A failure at one precision (not supported on this GPU, out of memory) is reported in that column;
the others still run. The "cached" column is the 16-bit request again with step caching on
(pipelines.step_cache), measured against the uncached 16-bit image: what "Fast (cached)" costs in quality.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from PIL import Image

from . import imagemetrics
from .device_policy import DevicePolicy
from .errors import user_message
from .precision import Backend, Capability, Precision
from .registry import ModelSpec, resolve_spec
from .request import GenerationRequest, GenerationResult, resolve_request
from .run_context import JobCancelled, Progress

SIXTEEN_BIT = "16-bit"  # the Compare tab's choice; becomes bf16 or fp16 per model (`reference_precision`)
CACHED = "cached"  # the 16-bit run again with step caching ("fast")
CHOICES = (SIXTEEN_BIT, Precision.FP8.value, Precision.FP4.value)  # the default selection; CACHED is opt-in
_ORDER = {Precision.BF16: 0, Precision.FP16: 0, Precision.FP8: 1, Precision.FP4: 2}

ProgressCallback = Callable[[Precision, int, int, Progress], None]  # precision, index, count, progress


@dataclass(frozen=True)
class CompareEntry:
    precision: Precision
    result: GenerationResult | None = None
    error: str | None = None  # the user-facing message when this precision did not run
    is_reference: bool = False
    psnr_db: float | None = None  # against the 16-bit image; inf when identical
    ssim: float | None = None
    max_difference: int | None = None  # largest per-channel difference, in 8-bit levels
    heatmap: Image.Image | None = None
    cached: bool = False  # the reference precision with step caching on
    # The columns share their 16-bit text encoders, so with the prompt cache one column encodes the prompt and the
    # others reuse it: that encoding's time, counted in every column's latency that reused it.
    prompt_ms: float = 0.0

    @property
    def column(self) -> str:
        """The entry's column: its precision's value, or CACHED."""
        return CACHED if self.cached else self.precision.value

    @property
    def label(self) -> str:
        return f"{self.precision.label}, fast (cached)" if self.cached else self.precision.label

    @property
    def image(self) -> Image.Image | None:
        return self.result.images[0] if self.result else None

    @property
    def latency_ms(self) -> float | None:
        """Text encoders + denoising + VAE: the warm work, not counting model loads or engine builds (a reused
        prompt counted at what encoding it took, so no column is faster for having run after another)."""
        if not self.result:
            return None
        t = self.result.timings
        return t.total_ms + (self.prompt_ms if t.prompt_reused else 0.0)

    @property
    def load_ms(self) -> float | None:
        return self.result.timings.load_ms if self.result else None

    @property
    def peak_memory_bytes(self) -> int | None:
        return self.result.peak_memory_bytes if self.result else None

    @property
    def runs_as(self) -> str | None:
        return self.result.runs_as if self.result else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly figures (no images) for the API."""
        r = self.result
        return {
            "precision": self.precision.value, "cached": self.cached, "ok": r is not None, "error": self.error,
            "is_reference": self.is_reference, "runs_as": self.runs_as,
            "backend": r.backend if r else None, "latency_ms": self.latency_ms, "load_ms": self.load_ms,
            "timings": _timings_dict(r) if r else None, "peak_memory_bytes": self.peak_memory_bytes,
            "psnr_db": None if self.psnr_db is None else (None if self.psnr_db == float("inf") else self.psnr_db),
            "identical_to_reference": self.psnr_db == float("inf") if self.psnr_db is not None else None,
            "ssim": self.ssim, "max_difference": self.max_difference,
            "warnings": list(r.warnings) if r else [],
        }


@dataclass(frozen=True)
class Comparison:
    request: GenerationRequest  # resolved (defaults filled, the shared seed chosen), at the reference precision
    entries: tuple[CompareEntry, ...]
    reference: Precision | None  # the 16-bit run the metrics are measured against, if it ran
    note: str | None = None  # why there are no metrics, when there are none

    def entry(self, precision: Precision | str) -> CompareEntry | None:
        """The uncached entry at `precision`, or the cached one for CACHED."""
        if precision == CACHED:
            return next((e for e in self.entries if e.cached), None)
        precision = Precision.parse(precision)
        return next((e for e in self.entries if e.precision is precision and not e.cached), None)

    def to_dict(self) -> dict[str, Any]:
        req = self.request
        return {"model": req.model, "prompt": req.prompt, "seed": req.seed, "width": req.width, "height": req.height,
                "steps": req.steps, "guidance": req.guidance, "loras": [[n, s] for n, s in req.loras],
                **({"strength": req.strength, "input_image_sha256": req.image.sha256} if req.image is not None else {}),
                "reference": self.reference.value if self.reference else None, "note": self.note,
                "entries": [e.to_dict() for e in self.entries]}


def _timings_dict(result: GenerationResult) -> dict[str, Any]:
    t = result.timings
    return {"text_encoders_ms": t.text_encoders_ms, "steps_ms": list(t.steps_ms), "denoise_ms": t.denoise_ms,
            "vae_ms": t.vae_ms, "total_ms": t.total_ms, "load_ms": t.load_ms}


def reference_precision(spec: ModelSpec, capability: Capability | None) -> Precision:
    """The 16-bit precision FP8/FP4 compute in for this model here (Flux: bf16; SDXL: fp16 on a GPU, bf16 on a CPU)."""
    return DevicePolicy.for_device(capability).reference_precision(spec)


def plan_precisions(selected: Iterable[str | Precision], spec: ModelSpec, capability: Capability | None) -> list[Precision]:
    """The runs to make, 16-bit first then FP8 then FP4, without repeats. "16-bit" picks the model's reference."""
    out: list[Precision] = []
    for item in selected:
        if isinstance(item, str) and item.strip().lower().replace(" ", "") in ("16-bit", "16bit", "16"):
            p = reference_precision(spec, capability)
        else:
            p = Precision.parse(item)
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError(f"Select at least one precision to compare ({', '.join((*CHOICES, CACHED))}).")
    return sorted(out, key=lambda p: _ORDER[p])


def run_comparison(manager: Any, request: GenerationRequest, precisions: Iterable[str | Precision], *,
                   on_progress: ProgressCallback | None = None, on_job: Callable[[Any], None] | None = None,
                   cancel: threading.Event | None = None) -> Comparison:
    """Render `request` at each precision through `manager` (a PipelineManager) and measure the differences.

    Raises RequestError / UnknownModelError / ValueError for input that no precision could run
    (a bad size, an unknown model, nothing selected); everything precision-specific lands in its entry.
    `on_job(job)` is told each job as it is submitted (for queue position and cancelling).
    """
    spec = resolve_spec(request.model)
    capability = manager.info.capability
    precisions = list(precisions)
    with_cached = CACHED in precisions
    reference = reference_precision(spec, capability)
    others = [p for p in precisions if p != CACHED]
    plan = plan_precisions(others, spec, capability) if others or not with_cached else []
    runs = [(p, "off") for p in plan] + ([(reference, "fast")] if with_cached else [])
    # Validate the shared fields and pick the one seed now, so a bad size is one message, not one per
    # precision. FP16 runs everywhere with the torch backend; each precision's own support is checked per run.
    shared = resolve_request(replace(request, precision=Precision.FP16, num_images=1), spec, capability, Backend.TORCH)
    cancel = cancel or threading.Event()

    results: dict[tuple[Precision, str], GenerationResult] = {}  # by (precision, cache)
    errors: dict[tuple[Precision, str], str] = {}
    for index, (precision, cache) in enumerate(runs):
        run = (precision, cache)
        if cancel.is_set():
            errors[run] = "Cancelled."
            continue
        # The caller's model string (a registry id or an offered folder) goes to the manager unchanged.
        run_request = replace(shared, model=request.model, precision=precision, backend=request.backend, cache=cache)
        report = None
        if on_progress is not None:
            report = lambda progress, p=precision, i=index: on_progress(p, i, len(runs), progress)  # noqa: E731
        try:
            job = manager.submit(run_request, on_progress=report)
            if on_job is not None:
                on_job(job)
            while not job.done:  # wake up now and then so a cancel reaches a job still waiting in the queue
                if cancel.wait(0.2):
                    job.cancel()
                    break
            results[run] = job.result()
        except JobCancelled:
            errors[run] = "Cancelled."
        except Exception as exc:
            errors[run] = user_message(exc)

    ref_result = results.get((reference, "off"))
    note = None
    if reference not in plan:
        note = f"Select {SIXTEEN_BIT} to measure PSNR / SSIM against the {reference.value} image."
    elif ref_result is None:
        note = f"The {reference.value} image could not be made, so there is nothing to measure against."

    prompt_ms = max((r.timings.text_encoders_ms for r in results.values()), default=0.0)
    entries = []
    for precision, cache in runs:
        result = results.get((precision, cache))
        cached = cache != "off"
        is_reference = precision is reference and not cached
        entry = CompareEntry(precision, result, errors.get((precision, cache)), is_reference=is_reference,
                             cached=cached, prompt_ms=prompt_ms)
        if result is not None and ref_result is not None and not is_reference:
            a, b = ref_result.images[0], result.images[0]
            entry = replace(entry, psnr_db=imagemetrics.psnr(a, b), ssim=imagemetrics.ssim(a, b),
                            max_difference=imagemetrics.max_abs_difference(a, b),
                            heatmap=imagemetrics.difference_heatmap(a, b))
        entries.append(entry)
    return Comparison(replace(shared, model=spec.id, precision=reference), tuple(entries),
                      reference if ref_result is not None else None, note)
