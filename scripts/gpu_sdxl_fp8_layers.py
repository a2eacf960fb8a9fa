"""Issue 17: which of SDXL's Linear layers pay for FP8 on the PyTorch backend? Today FP8 replaces them all and the
compiled UNet step is slower than fp16 (49.1 vs 43.4 ms on an H200, 2026-11-26). The arithmetic behind the question
(per transformer block of C channels over N tokens): the feed-forward GEMMs are 12·N·C² of the block's ~18·N·C² of
Linear work, each one big (1280 -> 10240 over 2048 rows at 1024x1024), while the attention projections are small
GEMMs (1280x1280, or 77 text tokens for the cross-attention keys and values) whose per-call activation
quantization costs about what FP8 saves. Prediction: FP8 on the feed-forward layers alone is faster than fp16.
Measured 2026-12-07 on an H100 (BENCHMARKS.md): wrong, 54.2 against 36.1 ms, about 130 us more per FP8 layer.

Each variant loads the same random full-size UNet (seeded), converts it, compiles it as the app compiles SDXL
(the whole UNet) and times one CFG step (batch 2) at 1024x1024; error = relative L2 against the first variant.

    python3 scripts/gpu_sdxl_fp8_layers.py --out $OUT                        # on the lent GPU; ~1-2 min a variant cold
    python3 scripts/gpu_sdxl_fp8_layers.py --device cpu --model demo-sdxl --size 64 --runs 2 --out /tmp/f8   # smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_step import kernel_profile  # noqa: E402
from gpu_sdxl_unet_levers import compile_and_time, relative_error, unet_inputs  # noqa: E402
from pipelines.device_policy import DevicePolicy  # noqa: E402
from pipelines.families import family_of  # noqa: E402
from pipelines.families.sdxl_attention import fuse_qkv_projections  # noqa: E402
from pipelines.gpu import probe_device  # noqa: E402
from pipelines.loading import WeightSource, load_component  # noqa: E402
from pipelines.precision import Precision  # noqa: E402
from pipelines.quant import Fp8Linear, quantize_linears  # noqa: E402
from pipelines.registry import resolve_spec  # noqa: E402


def feed_forward_only(unet: torch.nn.Module, dtype: torch.dtype) -> int:
    """FP8 for the Linear layers of every transformer block's feed-forward network (GEGLU in, Linear out)."""
    count = 0
    for name, module in unet.named_modules():
        if name.endswith(".ff"):
            count += quantize_linears(module, Precision.FP8, (), dtype).quantized
    return count


def all_linears(unet: torch.nn.Module, spec, dtype: torch.dtype) -> int:
    return quantize_linears(unet, Precision.FP8, family_of(spec).keep_16bit, dtype).quantized


# label: (FP8 conversion, fused QKV at 16 bits, torch.compile mode, FP8 GEMM output: None = Fp8Linear's choice,
# fp16 on Hopper since 2026-12-08). The CUDA-graph variants came from the 2026-12-08 profile: the FP8 steps'
# kernels took 33-38 ms of 70-93 ms steps, so the GPU waited on the host.
BF16 = torch.bfloat16
VARIANTS = {
    "fp16 + fused QKV (today's fp16)": (None, True, None, None),
    "fp8, every Linear (today's fp8)": ("all", False, None, None),
    "fp8 feed-forward only": ("ff", False, None, None),
    "fp8 feed-forward only + fused QKV": ("ff", True, None, None),
    "fp16 + fused QKV, CUDA graphs": (None, True, "reduce-overhead", None),
    "fp8 feed-forward only, CUDA graphs": ("ff", False, "reduce-overhead", None),
    "fp8 every Linear, CUDA graphs": ("all", False, "reduce-overhead", None),
    "fp8 every Linear, bf16 GEMM output (before 2026-12-08)": ("all", False, None, BF16),
    "fp8 every Linear, CUDA graphs, bf16 GEMM output": ("all", False, "reduce-overhead", BF16),
    "fp8 every Linear + FP8 QKV fused": ("all", True, None, None),
    "fp8 every Linear + FP8 QKV fused, CUDA graphs": ("all", True, "reduce-overhead", None),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sdxl-base-1.0")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--budget", type=float, default=420, help="seconds; a variant that would start later is skipped")
    p.add_argument("--variants", type=int, nargs="+", default=None, help="by position; default: all")
    p.add_argument("--profile", action="store_true",
                   help="also torch.profiler's kernels of each variant (GPU only): OUT/kernels-<position>.txt")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    spec = resolve_spec(args.model)
    dtype = DevicePolicy.for_info(probe_device(args.device)).compute_dtype(spec, "fp16")
    inputs = unet_inputs(spec, args.size, dtype, args.device)
    summary: dict = {"model": spec.id, "size": args.size, "dtype": str(dtype), "date": time.strftime("%Y-%m-%d"),
                     "device": torch.cuda.get_device_name() if cuda else "CPU", "torch": torch.__version__, "rows": []}
    chosen = list(enumerate(VARIANTS.items()))
    if args.variants is not None:  # in the order given, so a variant can run both before and after another
        chosen = [chosen[i] for i in args.variants]
    reference = None
    for position, (label, (fp8, fused, mode, gemm_out)) in chosen:
        if time.monotonic() - started > args.budget:
            summary["rows"].append({"variant": label, "skipped": "past --budget"})
            continue
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        unet = load_component(spec, "unet", dtype=dtype, device=args.device,
                              source=WeightSource(random_weights=True)).eval()
        quantized = 0
        if fp8 == "all":
            quantized = all_linears(unet, spec, dtype)
        elif fp8 == "ff":
            quantized = feed_forward_only(unet, dtype)
        for layer in unet.modules():
            if isinstance(layer, Fp8Linear) and gemm_out is not None:
                layer.gemm_out_dtype = gemm_out
        fused_modules = fuse_qkv_projections(unet) if fused else 0
        with torch.inference_mode():
            found = compile_and_time(unet, inputs, args.runs, cuda, mode=mode)
        if reference is None:
            reference = found["output"]
        gemm_outs = {str(layer.gemm_out_dtype) for layer in unet.modules() if isinstance(layer, Fp8Linear)}
        row = {"variant": label, "fp8_linears": quantized, "gemm_out": sorted(gemm_outs), "fused_attention": fused_modules,
               "step_ms": round(found["step_ms"], 2),
               "host_ms": round(found["host_ms"], 2), "compile_s": round(found["compile_s"], 1),
               "relative_error_vs_first": round(relative_error(found["output"], reference), 5), "finite": found["finite"],
               # a graph break inside the UNet sends every call back through Python between compiled pieces
               "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
        if args.profile and cuda:
            row.update(kernel_profile(lambda: found["compiled"](**inputs), out / f"kernels-{position}.txt"))
        summary["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "sdxl_fp8_layers.json").write_text(json.dumps(summary, indent=2) + "\n")
        del unet, found
        if cuda:
            torch.cuda.empty_cache()
    (out / "sdxl_fp8_layers.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
