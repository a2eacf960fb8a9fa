"""`python -m pipelines build`: export, quantize and build every component into engine_cache/, saying where each went.

Works without a GPU when TensorRT-RTX is installed (it builds ahead of time for a named target);
export and calibration then run on the CPU, which is fine for small models and slow for full-size ones.
"""
from __future__ import annotations

import argparse
import sys
import time

from ...config import engine_cache_dir
from ...engine_cache import EngineCache
from ...families import family_of
from ...gpu import GiB
from ...loading import HubOptions, ModelAccessError, WeightSource
from ...precision import Precision
from ...registry import ModelSpec, UnknownModelError, resolve_spec
from ..contract import CALIBRATION_PROMPTS, TensorRTOptions
from .artifacts import ArtifactBuilder
from .backend import TensorRTBackend
from .build import LAYERS_SUFFIX, LOG_SUFFIX, parse_target, target_name
from .export import DATA_SUFFIX, onnx_size
from .trt_api import BuildFailed, BuildRefused, TensorRTUnavailable, import_trt


def default_components(spec: ModelSpec) -> list[str]:
    """What text-to-image runs: the family's graph components (vae_encoder only on request). A refiner's text
    encoder and VAE are its base's: only its denoiser is its own."""
    if spec.is_refiner:
        return [spec.denoiser]
    return list(family_of(spec).adapters)


def run_build(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (BuildRefused, BuildFailed, TensorRTUnavailable, UnknownModelError, ModelAccessError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    spec = resolve_spec(args.model)
    precision = Precision.parse(args.precision)
    trt = import_trt()
    target = parse_target(args.target)
    source = WeightSource(random_weights=bool(args.random_weights) and spec.local_dir is None,
                          hub=HubOptions(token=args.hf_token, offline=True if args.offline else None))
    options = TensorRTOptions(
        width=args.width, height=args.height, min_size=args.min_size, max_size=args.max_size,
        max_batch=args.max_batch, onnx_source=getattr(args, "onnx_source", None) or "export",
        calibration_prompts=getattr(args, "calibration_prompts", None) or CALIBRATION_PROMPTS,
        calibration_steps=getattr(args, "calibration_steps", None),
        # Built streamable; how much of the weights stays on the GPU is chosen when the engine runs.
        weight_streaming_budget=0 if getattr(args, "weight_streaming", False) else None)
    cache = EngineCache(engine_cache_dir(args))
    backend = TensorRTBackend(cache, options, trt=trt)  # the same requests the app makes, so it finds them
    requests = [backend.request(spec, name, precision, target, source)
                for name in (args.components or default_components(spec))]
    ranges = requests[0].ranges

    device = "cuda" if torch.cuda.is_available() else "cpu"
    builder = ArtifactBuilder(cache, device, trt, report=lambda done, total, message: print(f"  {message}", flush=True))
    for req in requests:  # refuse before any export or calibration starts
        builder.check(req)
    print(f"{spec.id}: {precision.value} engines for {target_name(target)} with {trt.describe()}; sizes "
          f"{ranges.shapes_label()}, batch {ranges.batch_label()}; export/calibration on {device}; cache {cache.root}")
    started = time.monotonic()
    for req in requests:
        built = builder.engine(req)
        counts = ", ".join(f"{n} {p}" for p, n in sorted(built.report.precision_counts().items())) or "n/a"
        cached = " (already built)" if "cached" in built.seconds else f" ({sum(built.seconds.values()):.1f} s)"
        print(f"{req.component}{cached}: matrix multiplies: {counts}")
        print(f"  engine       {built.engine} ({built.report.engine_bytes / GiB:.3f} GiB)")
        print(f"  build log    {built.engine}{LOG_SUFFIX}")
        print(f"  layers       {built.engine}{LAYERS_SUFFIX}")
        if built.onnx:
            print(f"  onnx         {built.onnx} (+{DATA_SUFFIX}, {onnx_size(built.onnx) / GiB:.3f} GiB)")
        if built.calibration:
            print(f"  calibration  {built.calibration}")
    print(f"done in {time.monotonic() - started:.1f} s")
    return 0
