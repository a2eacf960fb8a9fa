"""Text the UI shows: results, comparison figures, progress and system state. Pure functions, no gradio."""
from __future__ import annotations

import math
from typing import Any

from pipelines.compare import CompareEntry, Comparison
from pipelines.imagemetrics import HEATMAP_FULL_SCALE
from pipelines.precision import Precision, PrecisionSupport, SupportLevel
from pipelines.request import GenerationResult
from pipelines.run_context import Progress

MiB, GiB = 2**20, 2**30
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float8_e4m3fn": "fp8"}  # one name per dtype


def short_dtype(text: str) -> str:
    """The names the precision choices use (bf16), for the torch dtype names components report (bfloat16)."""
    for long, short in DTYPE_NAMES.items():
        text = text.replace(long, short)
    return text


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n < GiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / GiB:.2f} GiB"


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "n/a"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def precision_label(support: PrecisionSupport) -> str:
    """A dropdown label: the precision and, unless native, what really runs (or that it cannot)."""
    p = support.precision
    if support.level is SupportLevel.NATIVE:
        return p.label  # the line under the dropdown says where and how it runs
    if support.level is SupportLevel.EMULATED:  # "FP8 (CPU emulation)", not "FP8 (FP8 (CPU emulation))"
        return support.runs_as if support.runs_as.startswith(p.label) else f"{p.label} ({support.runs_as})"
    return f"{p.label} (not available here)"


def precision_info(support: PrecisionSupport) -> str:
    return f"**{support.precision.label}:** {support.reason}"


def progress_text(progress: Progress | None, ahead: int, label: str = "") -> tuple[str, float]:
    """(what is happening, fraction done) for a job's latest progress report. The fraction is never None:
    the browser shows a progress text only beside a bar, so waiting and loading get an empty bar (0.0)."""
    prefix = f"{label}: " if label else ""
    if ahead > 0:
        return f"{prefix}Queued: {ahead} job{'s' if ahead != 1 else ''} ahead of yours", 0.0
    if progress is None or progress.stage == "queue":
        return f"{prefix}Starting", 0.0
    if progress.stage == "denoise":
        return f"{prefix}Denoising: step {progress.done}/{progress.total}", progress.fraction
    if progress.stage == "build":
        counts = f" ({progress.done}/{progress.total})" if progress.total > 1 else ""
        return f"{prefix}Building engine{counts}: {progress.message or 'first use of this size and precision'}", \
            (progress.fraction if progress.total > 1 else 0.0)
    if progress.stage == "vae":  # after the last step: a full bar, so the bar does not vanish while decoding
        return f"{prefix}Decoding the image (VAE)", 1.0
    if progress.stage == "text":
        return f"{prefix}Encoding the prompt", 0.0
    text = progress.message or {"load": "Loading"}.get(progress.stage, progress.stage)
    fraction = progress.fraction if progress.total > 1 else 0.0  # "1 of 1" says nothing about progress
    return prefix + text[:1].upper() + text[1:], fraction


def timings_dict(result: GenerationResult) -> dict[str, Any]:
    t = result.timings
    return {"text_encoders_ms": round(t.text_encoders_ms, 1), "steps_ms": [round(s, 1) for s in t.steps_ms],
            "denoise_ms": round(t.denoise_ms, 1), "vae_ms": round(t.vae_ms, 1), "total_ms": round(t.total_ms, 1),
            "load_ms": round(t.load_ms, 1), "vae_encoder_ms": round(t.vae_encoder_ms, 1),
            "model_calls": len(t.steps_ms) if t.model_calls is None else t.model_calls}


def result_details(result: GenerationResult, model_name: str, files: list[str]) -> dict[str, Any]:
    """Everything about a result for the API and the Details panel (JSON-serialisable). The model is given
    by its offered name: the request's model string may be a folder path on the server."""
    return {**result.settings(), "model": model_name, "timings": timings_dict(result), "peak_memory_bytes": result.peak_memory_bytes,
            "warnings": list(result.warnings), "files": [f.rsplit("/", 1)[-1] for f in files]}


def peak_text(n: int | None) -> str:
    return "n/a (a CPU has no peak-memory counter)" if n is None else fmt_bytes(n)


def result_markdown(result: GenerationResult) -> str:
    t = result.timings
    seeds = ", ".join(str(s) for s in result.seeds)
    lines = [
        f"**Seed{'s' if len(result.seeds) > 1 else ''}:** {seeds}",
        f"**Ran as:** {result.runs_as} · {result.backend} · {result.device}"
        + (" · fast (cached steps)" if result.request.cache == "fast" else ""),
        f"**Peak memory:** {peak_text(result.peak_memory_bytes)}",
        *(["**LoRAs:** " + ", ".join(f"{name} × {scale:g}" for name, scale in result.request.loras)]
          if result.request.loras else []),
        *input_lines(result.request),
        *([f"**Refiner:** {result.refiner_id} ran the last {t.refiner_steps} of {len(t.steps_ms)} steps "
           f"(hand-off at {result.request.refiner:g})"] if result.refiner_id else []),
        "**Timings:** " + ("text encoders: prompt reused · " if t.prompt_reused else
                           f"text encoders {fmt_ms(t.text_encoders_ms)} · ")
        + (f"VAE encoder {fmt_ms(t.vae_encoder_ms)} · " if t.vae_encoder_ms else "") + f"{len(t.steps_ms)} steps"
        + (f" ({t.model_calls} ran the model)" if t.model_calls is not None and t.model_calls < len(t.steps_ms) else "")
        + f" × {fmt_ms(t.mean_step_ms)} = {fmt_ms(t.denoise_ms)} · VAE {fmt_ms(t.vae_ms)} · **total {fmt_ms(t.total_ms)}**"
        + (f" (+ loading {fmt_ms(t.load_ms)})" if t.load_ms else ""),
    ]
    lines += [f"⚠ {w}" for w in result.warnings]
    return "\n\n".join(lines)


def input_lines(req) -> list[str]:
    """What the picture started from, so a run from an input image set earlier (its box since closed) says so."""
    if req.image is None:
        return []
    w, h = req.image.size
    if req.strength is None:  # a model that edits images: it takes no strength
        how = "edited by instruction"
    elif req.mask is not None:
        how = (f"inpainting where the mask is white{' (only the masked region)' if req.only_masked else ''}, "
               f"strength {req.strength:g}")
    else:
        how = f"image to image, strength {req.strength:g}"
    return [f"**Input image:** {w}×{h} · {how}"]


def compare_figures(entry: CompareEntry | None, reference: Precision | None) -> str:
    """The figures under one Compare image."""
    if entry is None:
        return "*Not selected.*"
    head = f"**{entry.label}**"
    if entry.result is None:
        return f"{head}\n\n⚠ {entry.error}"
    lines = [head,
             f"**Latency:** {fmt_ms(entry.latency_ms)}" + (f" (+ loading {fmt_ms(entry.load_ms)})" if entry.load_ms else ""),
             f"**Peak memory:** {peak_text(entry.peak_memory_bytes)}",
             f"**Ran as:** {entry.runs_as} · {entry.result.backend}"]
    if entry.is_reference:
        lines.append("**Reference** for PSNR / SSIM")
    elif entry.psnr_db is not None:
        psnr = "∞ (identical)" if math.isinf(entry.psnr_db) else f"{entry.psnr_db:.2f} dB"
        lines.append(f"**vs {reference.label if reference else '16-bit'}:** PSNR {psnr} · SSIM {entry.ssim:.4f} · "
                     f"max difference {entry.max_difference}/255")
    lines += [f"⚠ {w}" for w in entry.result.warnings]
    return "\n\n".join(lines)


def comparison_markdown(comparison: Comparison) -> str:
    req = comparison.request
    ran = sum(1 for e in comparison.entries if e.result is not None)
    lines = [f"**Seed:** {req.seed} · {req.model} · {req.width}×{req.height} · {req.steps} steps · "
             f"guidance {req.guidance:g} · {ran} of {len(comparison.entries)} precisions ran"]
    if comparison.note:
        lines.append(comparison.note)
    else:
        lines.append("Heat maps show the largest per-channel difference from the 16-bit image: black is none, "
                     f"pale yellow is {HEATMAP_FULL_SCALE:.0f}/255 or more (one scale for every column).")
    return "\n\n".join(lines)
