"""The CLI's generate / cache / models commands (bench and build live beside their engines)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .config import engine_cache_dir, hub_options, manager_config
from .engine_cache import EngineCache
from .gpu import GiB, parse_memory
from .image_input import read_image
from .loading import default_model, is_available_locally
from .lora import parse_lora_arg
from .manager import PipelineManager
from .pngmeta import save_png
from .schedulers import recorded_name
from .registry import HUB_MODELS, REFINER_MODELS, demo_specs, resolve_spec
from .request import GenerationRequest
from .run_context import Progress


def manager_from_args(args: argparse.Namespace) -> PipelineManager:
    return PipelineManager(manager_config(args, lora_paths=True))  # the CLI's user owns the files it names


def chosen_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    model, note = default_model(hub=hub_options(args))
    print(note)
    return model


def request_from_args(args: argparse.Namespace, model: str, precision: str) -> GenerationRequest:
    """The request the flags describe; input images are read (and checked) here, once, before any model work."""
    image = read_image(args.image) if args.image else None
    mask = read_image(args.mask, "mask") if args.mask else None
    return GenerationRequest(prompt=args.prompt, model=model, precision=precision, negative_prompt=args.negative_prompt,
                             width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
                             seed=args.seed, num_images=args.num_images, backend=args.backend, sampler=args.sampler,
                             image=image, strength=args.strength, mask=mask, mask_blur=args.mask_blur,
                             only_masked=args.only_masked, cache=getattr(args, "cache", "off"), refiner=args.refiner,
                             loras=tuple(parse_lora_arg(text) for text in getattr(args, "lora", None) or ()))


def print_progress(p: Progress) -> None:
    if p.stage == "denoise":
        print(f"\r  step {p.done}/{p.total}", end="\n" if p.done == p.total else "", flush=True)
    elif p.message:
        print(f"  {p.message}", flush=True)


def output_paths(out: str, count: int) -> list[Path]:
    base = Path(out)
    if base.suffix.lower() != ".png":
        base = base.with_suffix(".png")
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i + 1}{base.suffix}") for i in range(count)]


def run_generate(args: argparse.Namespace) -> int:
    model = chosen_model(args)
    manager = manager_from_args(args)
    try:
        result = manager.generate(request_from_args(args, model, args.precision), on_progress=print_progress)
    finally:
        manager.close()
    sampler = recorded_name(result.request.sampler, resolve_spec(model).components["scheduler"].class_name)
    for warning in result.warnings:
        print(f"warning: {warning}")
    for path, image, seed in zip(output_paths(args.out, len(result.images)), result.images, result.seeds):
        save_png(path, image, result.settings(), seed, sampler)
        print(f"saved {path} (seed {seed})")
    peak = "n/a (CPU)" if result.peak_memory_bytes is None else f"{result.peak_memory_bytes / GiB:.2f} GiB"
    print(f"{result.model_id} | {result.runs_as} | {result.backend} on {result.device} | peak memory {peak}")
    print(result.timings.summary())
    return 0


def run_cache(args: argparse.Namespace) -> int:
    cache = EngineCache(engine_cache_dir(args))
    if args.action == "list":
        entries = cache.entries()
        if not entries:
            print(f"{cache.root}: empty")
        for e in entries:
            key = e.manifest.key if e.manifest else None
            label = (f"{key.model} {key.component} {key.precision}/{key.recipe} {key.shapes} b{key.batch} "
                     f"{key.target} {key.backend} {key.backend_version}") if key else "(no valid manifest: will be rebuilt)"
            print(f"{e.size / GiB:8.2f} GiB  {label}  {e.path.name}")
        print(f"total {cache.total_bytes() / GiB:.2f} GiB in {cache.root}")
    elif args.action == "clear":
        print(f"removed {cache.clear()} artifact(s) from {cache.root}")
    else:
        if not args.max_size:
            raise SystemExit("cache prune needs --max-size, e.g. --max-size 50GB")
        removed = cache.prune(parse_memory(args.max_size, 0))
        print(f"removed {len(removed)} artifact(s); {cache.total_bytes() / GiB:.2f} GiB remain in {cache.root}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    for spec in HUB_MODELS + demo_specs() + REFINER_MODELS:  # refiners last: switches of their base, not models
        here = "weights here" if is_available_locally(spec) else ("gated, download" if spec.gated else "download")
        print(f"{spec.id:18} {spec.family.value:7} {here:16} {spec.description}")
    return 0


def run_doctor_command(args: argparse.Namespace) -> int:
    from .doctor import run_doctor, write_report

    print(f"Checking what works here (at most {args.budget:.0f} s; rows print as they finish)...", flush=True)
    report = run_doctor(args.device, args.budget,
                        on_check=lambda c: print(f"  {c.backend} {c.precision}: {c.status}", flush=True))
    print()
    print(report.table())
    path = write_report(report, Path(args.json_out))
    print(f"\nReport written to {path} ({'no failures' if report.ok else 'SOME CHECKS FAILED'}).")
    return 0 if report.ok else 1
