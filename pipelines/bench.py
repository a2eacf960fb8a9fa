"""`python -m pipelines bench`: per-stage timings and peak memory per precision, with a same-run baseline.

The baseline is the plain diffusers module in eager mode at the 16-bit type the precision computes in
(no quantization, no compile, no speed lever: the VAE in fp32 as diffusers runs SDXL's), run in the same process
on the same card, so ratios can be quoted. Each row's image is compared with the baseline's at the same seed
(PSNR / SSIM), so a lever that changes pictures shows. Each configuration starts from nothing resident, so its
peak memory is its own. `--suite` (or several `--model`s) runs every model; `--peer torchao` adds the published
recipe (torchao FP8 dynamic per-row + torch.compile of the whole denoiser) as a row of its own.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import torch

from . import imagemetrics
from .backends.contract import TorchOptions
from .backends.torch_backend import lever_states
from .commands import chosen_model, request_from_args
from .config import manager_config
from .errors import user_message
from .families import family_of
from .families.family import ImageUse
from .gpu import GiB
from .image_input import random_image
from .manager import PipelineManager
from .precision import Precision
from .registry import ModelSpec, resolve_spec
from .request import DEFAULT_STRENGTH

SUITE = ("flux.1-dev", "flux.1-schnell", "sdxl-base-1.0", "sdxl-turbo")
# The plain diffusers modules: no compile, no CUDA graphs, the VAE as diffusers runs it.
EAGER = TorchOptions(compile=False, cuda_graphs=False, bf16_vae=False)


@dataclass(frozen=True)
class BenchRow:
    label: str
    precision: str
    runs_as: str
    backend: str
    text_ms: float
    step_ms: float  # median over runs of the mean step time
    steps: int
    vae_ms: float
    total_ms: float  # text + (VAE encoder) + denoise + VAE (GPU time)
    wall_ms: float  # host time from submit to result, warm (no loading)
    load_ms: float  # first-run loading/quantizing/compiling
    peak_gib: float | None
    baseline: str | None = None  # which baseline row this compares to
    vae_encoder_ms: float = 0.0  # image to image: encoding the input image
    model: str = ""
    psnr_db: float | None = None  # image against the baseline's at the same seed (inf: identical)
    ssim: float | None = None
    cache: str = "off"
    error: str | None = None  # why this row did not run (a precision this GPU lacks, torchao missing)
    warnings: tuple[str, ...] = ()  # the first run's (e.g. "torch.compile failed ...; this model runs eager")
    size: str = ""  # the images' width x height as run (a request with no size takes the model's or the input's)


def bench_models(args: argparse.Namespace) -> list[str]:
    """--suite: the four Hub models; else each --model given (or the best model here)."""
    if args.suite:
        return list(SUITE)
    return list(args.model) if args.model else [chosen_model(args)]


def bench_precisions(args: argparse.Namespace, manager: PipelineManager, model: str) -> list[str]:
    """--precision as given; with --suite and no --precision: the model's 16-bit type, fp8 and fp4."""
    if args.precision is not None:
        return list(args.precision)
    if args.suite:
        return [manager.policy.reference_precision(resolve_spec(model)).value, Precision.FP8.value,
                Precision.FP4.value]
    return [Precision.BF16.value]


def _measure(manager: PipelineManager, args: argparse.Namespace, model: str, precision: str, label: str,
             baseline: str | None = None, cache: str = "off") -> tuple[BenchRow, object]:
    """The row and its first image; a precision or peer that cannot run gives a row with its reason."""
    try:
        return _measure_or_raise(manager, args, model, precision, label, baseline, cache)
    except Exception as exc:  # one row's failure (out of memory, a missing peer) must not lose the others
        return BenchRow(label=label, precision=precision, runs_as="-", backend="-", text_ms=0.0, step_ms=0.0,
                        steps=0, vae_ms=0.0, total_ms=0.0, wall_ms=0.0, load_ms=0.0, peak_gib=None,
                        baseline=baseline, model=model, error=user_message(exc)), None


def _measure_or_raise(manager: PipelineManager, args: argparse.Namespace, model: str, precision: str, label: str,
                      baseline: str | None, cache: str) -> tuple[BenchRow, object]:
    request = replace(request_from_args(args, model, precision), cache=cache)  # --cache fast adds its own rows
    if request.seed is None:
        request = replace(request, seed=0)  # every run renders the same image
    if request.image is None and family_of(resolve_spec(model)).image_use is ImageUse.CONTEXT:
        # An edit model needs an input: random pixels at the requested size (the step time depends on the
        # token counts, not on what the picture shows).
        spec = resolve_spec(model)
        request = replace(request, image=random_image(args.width or spec.default_width,
                                                      args.height or spec.default_height))
    first = manager.generate(request)
    for _ in range(max(args.warmup - 1, 0)):
        manager.generate(request)
    results, walls = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        results.append(manager.generate(request))
        walls.append((time.perf_counter() - started) * 1000)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    peaks = [r.peak_memory_bytes for r in results if r.peak_memory_bytes is not None]
    return BenchRow(label=label, precision=precision, runs_as=first.runs_as, backend=first.backend,
                    text_ms=med([r.timings.text_encoders_ms for r in results]),
                    step_ms=med([r.timings.mean_step_ms for r in results]), steps=len(first.timings.steps_ms),
                    vae_ms=med([r.timings.vae_ms for r in results]), total_ms=med([r.timings.total_ms for r in results]),
                    wall_ms=med(walls), load_ms=first.timings.load_ms,
                    vae_encoder_ms=med([r.timings.vae_encoder_ms for r in results]),
                    peak_gib=max(peaks) / GiB if peaks else None, baseline=baseline, model=model,
                    cache=first.request.cache, warnings=first.warnings,
                    size=f"{first.images[0].width}x{first.images[0].height}"), first.images[0]


def with_difference(row: BenchRow, image, reference) -> BenchRow:
    """`row` with its image's PSNR / SSIM against `reference` (the same seed at 16 bits)."""
    if image is None or reference is None:
        return row
    return replace(row, psnr_db=imagemetrics.psnr(reference, image), ssim=imagemetrics.ssim(reference, image))


def _peer_config(args: argparse.Namespace, peer: str):
    return manager_config(args, backend="torch", torch=TorchOptions(compile=True, cuda_graphs=False, bf16_vae=False,
                                                                     peer=peer), lora_paths=True)


def run_bench(args: argparse.Namespace) -> int:
    models = bench_models(args)
    for model in models:
        resolve_spec(model)  # an unknown model fails before anything loads
    results: dict[str, tuple[list[BenchRow], dict[str, BenchRow], PipelineManager]] = {}
    for model in models:
        results[model] = _bench_model(args, model)
    for model, (rows, baselines, manager) in results.items():
        print(_report(args, manager, resolve_spec(model), rows, baselines) + "\n")
    if args.json_out:
        device = next(iter(results.values()))[2].info.name
        with open(args.json_out, "w") as f:
            json.dump({"models": {model: {"rows": [asdict(r) for r in rows],
                                          "baselines": {k: asdict(v) for k, v in baselines.items()}}
                                  for model, (rows, baselines, _) in results.items()},
                       "device": device, "command": _command(), "date": _today()}, f, indent=2)
    return 0


def _bench_model(args: argparse.Namespace, model: str) -> tuple[list[BenchRow], dict[str, BenchRow], PipelineManager]:
    """The model's rows, its baselines, and the (closed) manager that ran Prism's rows, for the report."""
    spec = resolve_spec(model)
    rows: list[BenchRow] = []
    baselines: dict[str, BenchRow] = {}
    references: dict[str, object] = {}  # 16-bit precision -> the baseline's image (or prism's, without one)

    def record(row: BenchRow, image, base: str) -> None:
        row = with_difference(row, image, references.get(base))
        rows.append(row)
        print(f"measured {row}", flush=True)  # partial results survive a time limit

    # One manager at a time runs torch, each closed (its worker thread ended) before the next runs anything. Why:
    # on a CPU each thread that has run torch ops keeps its own OpenMP team, and with two such threads alive every
    # small op slowed on both (most likely libgomp waiting less actively once it manages more threads than there
    # are cores; not verified further). With the baseline's manager left alive, demo-flux's 20 steps took 371 ms on
    # Prism's manager where they took 204 ms on the baseline's, and 388 ms on the baseline's again afterwards; with
    # the baseline's manager closed first, 266 ms (2-core AMD EPYC, 2026-12-07).
    with contextlib.closing(PipelineManager(manager_config(args, lora_paths=True))) as manager:
        # The baseline runs in the 16-bit type each precision computes in (bf16 for Flux FP8/FP4, fp16 for SDXL),
        # before Prism's rows, on a manager of its own that is gone before Prism's manager runs anything.
        precisions = bench_precisions(args, manager, model)
        bases = {precision: manager.policy.reference_precision(spec, precision).value for precision in precisions}
        if not args.no_baseline:
            baseline_config = manager_config(args, backend="torch", torch=EAGER, lora_paths=True)
            with contextlib.closing(PipelineManager(baseline_config)) as baseline:
                for base in dict.fromkeys(bases.values()):
                    baselines[base], references[base] = _measure(baseline, args, model, base,
                                                                 f"baseline: diffusers eager {base}")
                    print(f"measured {baselines[base]}", flush=True)
                    baseline.unload()
        for precision in precisions:
            base = bases[precision]
            row, image = _measure(manager, args, model, precision, f"prism {precision}",
                                  None if args.no_baseline else base)
            if base not in references and precision == base:
                references[base] = image  # no baseline: later rows compare with prism's own 16-bit image
            record(row, image, base)
            if args.cache == "fast" and not row.error:  # the same precision again with step caching
                record(*_measure(manager, args, model, precision, f"prism {precision} + cache fast",
                                 None if args.no_baseline else base, cache="fast"), base)
            manager.unload()
    if args.peer:
        base = manager.policy.reference_precision(spec, Precision.FP8).value
        with contextlib.closing(PipelineManager(_peer_config(args, args.peer))) as peer:
            record(*_measure(peer, args, model, base, f"peer: {args.peer} FP8 per-row + compile",
                             None if args.no_baseline else base), base)
    return rows, baselines, manager


def _command() -> str:
    return "python -m pipelines " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def _report(args, manager: PipelineManager, spec: ModelSpec, rows: list[BenchRow], baselines: dict[str, BenchRow]) -> str:
    info = manager.info
    model, edits = spec.id, family_of(spec).image_use is ImageUse.CONTEXT
    if edits:  # the input's tokens ride along with the noise's at every step
        task = f", an edit of {'the input image' if args.image else 'a random-pixel input'}"
    elif args.image:
        task = f", image to image at strength {args.strength or DEFAULT_STRENGTH:g}" + (" with a mask" if args.mask else "")
    else:
        task = ""
    size = next((r.size for r in rows if r.size), f"{args.width or 'default'}x{args.height or 'default'}")
    lines = [
        f"### {model} {rows[0].steps if rows else '?'} steps, {size}, "
        f"batch {args.num_images}{task}"
        + (f", base + refiner (switch at {args.refiner:g}; steps counts both)" if args.refiner is not None else ""),
        f"- card: {info.name} (compute capability {info.capability_text}); torch {torch.__version__}; "
        f"{platform.machine()}; date {_today()}",
        f"- command: `{_command()}`",
        "- PyTorch levers: " + ", ".join(f"{name} {state}" for name, state in
                                         lever_states(manager.config.torch, info.is_cuda).items()),
        f"- medians of {args.runs} run(s) after {args.warmup} warm-up; GPU times from CUDA events; "
        "`wall` is submit-to-result on the host with everything loaded; `load` is the first run's loading/quantizing.",
        "",
        "| config | runs as | text enc ms | VAE enc ms | step ms | VAE ms | total ms | wall ms | load s | peak GiB | "
        "speed-up vs baseline (step / total) | PSNR dB / SSIM vs 16-bit |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in list(baselines.values()) + rows:
        if row.error:
            lines.append(f"| {row.label} | not run: {row.error} |" + " - |" * 10)
            continue
        base = baselines.get(row.baseline) if row.baseline else None
        ratio = (f"{base.step_ms / row.step_ms:.2f}x / {base.total_ms / row.total_ms:.2f}x"
                 if base and row.step_ms and row.total_ms else "-")
        peak = f"{row.peak_gib:.1f}" if row.peak_gib is not None else "n/a"
        encoder = f"{row.vae_encoder_ms:.0f}" if args.image or edits else "-"
        lines.append(f"| {row.label} | {row.runs_as} | {row.text_ms:.0f} | {encoder} | {row.step_ms:.1f} | {row.vae_ms:.0f} | "
                     f"{row.total_ms:.0f} | {row.wall_ms:.0f} | {row.load_ms / 1000:.1f} | {peak} | {ratio} | "
                     f"{difference_text(row)} |")
    return "\n".join(lines)


def difference_text(row: BenchRow) -> str:
    if row.psnr_db is None:
        return "-"
    return ("identical" if row.psnr_db == float("inf") else f"{row.psnr_db:.1f}") + f" / {row.ssim:.3f}"
