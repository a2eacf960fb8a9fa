"""`python -m pipelines bench`: per-stage timings and peak memory per precision, with a same-run baseline.

The baseline is the plain diffusers module in eager mode at the 16-bit type the precision computes in
(no quantization, no compile), run in the same process on the same card, so ratios can be quoted.
Each configuration starts from nothing resident, so its peak memory is its own.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import torch

from .backends.contract import TorchOptions
from .commands import chosen_model, request_from_args
from .config import manager_config
from .families import family_of
from .families.family import ImageUse
from .gpu import GiB
from .image_input import random_image
from .manager import PipelineManager
from .registry import ModelSpec, resolve_spec
from .request import DEFAULT_STRENGTH


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


def _measure(manager: PipelineManager, args: argparse.Namespace, model: str, precision: str, label: str,
             baseline: str | None = None) -> BenchRow:
    request = request_from_args(args, model, precision)
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
                    peak_gib=max(peaks) / GiB if peaks else None, baseline=baseline)


def run_bench(args: argparse.Namespace) -> int:
    model = chosen_model(args)
    spec = resolve_spec(model)
    manager = PipelineManager(manager_config(args, lora_paths=True))
    # compile=False spelled out: the default (None) compiles on CUDA, which made this "eager" baseline a
    # compiled one after compile became the default (2026-12-01: SDXL 35.9 ms "eager" = compiled speed).
    eager = TorchOptions(compile=False)
    baseline = None if args.no_baseline else PipelineManager(manager_config(args, backend="torch", torch=eager,
                                                                            lora_paths=True))
    rows: list[BenchRow] = []
    baselines: dict[str, BenchRow] = {}
    try:
        for precision in args.precision:
            # The baseline runs in the 16-bit type this precision computes in (bf16 for Flux FP8/FP4, fp16 for SDXL).
            base = manager.policy.reference_precision(spec, precision).value
            if baseline is not None and base not in baselines:
                baselines[base] = _measure(baseline, args, model, base, f"baseline: diffusers eager {base}")
                print(f"measured {baselines[base]}", flush=True)  # partial results survive a time limit
                baseline.unload()
            rows.append(_measure(manager, args, model, precision, f"prism {precision}",
                                 base if baseline is not None else None))
            print(f"measured {rows[-1]}", flush=True)
            manager.unload()
    finally:
        manager.close()
        if baseline is not None:
            baseline.close()
    report = _report(args, manager, spec, rows, baselines)
    print(report)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "baselines": {k: asdict(v) for k, v in baselines.items()},
                       "device": manager.info.name, "command": _command(), "date": _today()}, f, indent=2)
    return 0


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
    lines = [
        f"### {model} {rows[0].steps if rows else '?'} steps, {args.width or 'default'}x{args.height or 'default'}, "
        f"batch {args.num_images}{task}",
        f"- card: {info.name} (compute capability {info.capability_text}); torch {torch.__version__}; "
        f"{platform.machine()}; date {_today()}",
        f"- command: `{_command()}`",
        f"- medians of {args.runs} run(s) after {args.warmup} warm-up; GPU times from CUDA events; "
        "`wall` is submit-to-result on the host with everything loaded; `load` is the first run's loading/quantizing.",
        "",
        "| config | runs as | text enc ms | VAE enc ms | step ms | VAE ms | total ms | wall ms | load s | peak GiB | "
        "step speed-up vs baseline |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in list(baselines.values()) + rows:
        base = baselines.get(row.baseline) if row.baseline else None
        ratio = f"{base.step_ms / row.step_ms:.2f}x" if base and row.step_ms else "-"
        peak = f"{row.peak_gib:.1f}" if row.peak_gib is not None else "n/a"
        encoder = f"{row.vae_encoder_ms:.0f}" if args.image or edits else "-"
        lines.append(f"| {row.label} | {row.runs_as} | {row.text_ms:.0f} | {encoder} | {row.step_ms:.1f} | {row.vae_ms:.0f} | "
                     f"{row.total_ms:.0f} | {row.wall_ms:.0f} | {row.load_ms / 1000:.1f} | {peak} | {ratio} |")
    return "\n".join(lines)
