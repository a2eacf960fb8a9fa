"""Issue 17's SDXL levers not tried yet, measured on the UNet alone (one CFG step at 1024x1024, batch 2):
channels-last memory for the convolutions, fused QKV projections, inductor's tuning flags and cuDNN's algorithm
search (cudnn.benchmark), every variant compiled as the app compiles SDXL (the whole UNet, default mode).

    python3 scripts/gpu_sdxl_unet_levers.py --out $OUT      # on the lent GPU; ~90 s of compiling a variant, cold
    python3 scripts/gpu_sdxl_unet_levers.py --device cpu --model demo-sdxl --size 64 --runs 2 --out /tmp/s   # smoke run

Random full-size weights through the app's own loader (nothing downloaded). Each variant's output is compared
with today's (relative L2 error): channels-last and fused projections are exact rewrites up to rounding order.
The published recipe these come from is the PyTorch blog "Accelerating Generative AI Part III: Diffusion, Fast".
Writes OUT/sdxl_unet_levers.json; rows are printed as they finish (a variant past --budget seconds is skipped).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_step import sdxl_inputs, timed  # noqa: E402
from pipelines.device_policy import DevicePolicy  # noqa: E402
from pipelines.families.sdxl_attention import fuse_qkv_projections  # noqa: E402
from pipelines.gpu import probe_device  # noqa: E402
from pipelines.loading import WeightSource, load_component  # noqa: E402
from pipelines.registry import resolve_spec  # noqa: E402

# inductor settings of the published recipe (blog above): 1x1 convolutions as matmuls, a coordinate-descent search
# over each Triton kernel's launch parameters, and no epilogue fusion into matmul templates.
TUNING_FLAGS = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                "coordinate_descent_check_all_directions": True}


def unet_inputs(spec, size: int, dtype: torch.dtype, device: str) -> dict:
    """One CFG step's inputs (gpu_profile_step's, as the app's adapter takes them) in the diffusers UNet's form."""
    inputs = sdxl_inputs(spec, size, dtype, device)
    inputs["added_cond_kwargs"] = {"text_embeds": inputs.pop("text_embeds"), "time_ids": inputs.pop("time_ids")}
    return inputs


def compile_and_time(unet: torch.nn.Module, inputs: dict, runs: int, cuda: bool, flags: dict | None = None,
                     mode: str | None = None) -> dict:
    """`unet` compiled as the app compiles SDXL (the whole UNet, in torch.compile `mode`), under inductor `flags`:
    its compile seconds, the median ms of a step after two warm calls, the median host ms of issuing one (no wait
    for the GPU: a step whose host ms reach its step ms is bound by the host, not the GPU), its output (float32),
    whether the first one was finite, and the compiled module."""
    compiled = torch.compile(unet, mode=mode)
    t0 = time.monotonic()
    with torch._inductor.config.patch(flags or {}):
        first = compiled(**inputs).sample  # compiles here, under the flags
    compile_s = time.monotonic() - t0
    finite = bool(torch.isfinite(first).all())  # now: CUDA graphs' next replay overwrites `first`
    for _ in range(2):
        compiled(**inputs)
    ms = timed(lambda: compiled(**inputs), runs, cuda)
    host = []
    for _ in range(5):
        began = time.perf_counter()
        compiled(**inputs)
        host.append((time.perf_counter() - began) * 1000)
        if cuda:
            torch.cuda.synchronize()
    return {"step_ms": ms, "host_ms": statistics.median(host), "compile_s": compile_s,
            "output": compiled(**inputs).sample.float(), "finite": finite, "compiled": compiled}


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm()).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sdxl-base-1.0")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--budget", type=float, default=540, help="seconds; a variant that would start later is skipped")
    p.add_argument("--variants", type=int, nargs="+", default=None,
                   help="which variants to run, by position (the first one run is the reference of the errors); "
                        "default: all")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    spec = resolve_spec(args.model)
    policy = DevicePolicy.for_info(probe_device(args.device))
    dtype = policy.compute_dtype(spec, "fp16")  # fp16 on a GPU, as the app runs SDXL; fp32 on a CPU without fast fp16
    unet = load_component(spec, "unet", dtype=dtype, device=args.device, source=WeightSource(random_weights=True)).eval()
    inputs = unet_inputs(spec, args.size, dtype, args.device)
    summary: dict = {"model": spec.id, "size": args.size, "dtype": str(dtype), "date": time.strftime("%Y-%m-%d"),
                     "device": torch.cuda.get_device_name() if cuda else "CPU", "torch": torch.__version__, "rows": []}
    # (label, channels-last, fused QKV, inductor flags, cuDNN algorithm search); fusing cannot be undone, so the
    # variants with fused projections come after those without
    variants = [("compile, separate QKV (before 2026-12-07)", False, False, {}, False),
                ("+ channels-last", True, False, {}, False),
                ("+ channels-last + fused QKV", True, True, {}, False),
                ("+ channels-last + fused QKV + inductor tuning flags", True, True, TUNING_FLAGS, False),
                ("today: compile + fused QKV", False, True, {}, False),
                ("today + cudnn.benchmark", False, True, {}, True),
                ("today + channels-last + cudnn.benchmark", True, True, {}, True)]
    if args.variants is not None:
        variants = [variants[i] for i in sorted(set(args.variants))]
    reference = None
    with torch.inference_mode():
        for label, channels_last, fused, flags, search in variants:
            if time.monotonic() - started > args.budget:
                summary["rows"].append({"variant": label, "skipped": "past --budget"})
                continue
            torch._dynamo.reset()
            torch.backends.cudnn.benchmark = search  # this script's process only: it measures the setting
            unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            if fused and not any(getattr(m, "fused_projections", False) for m in unet.modules()):
                fuse_qkv_projections(unet)  # as the app fuses them (views, no second copy)
            found = compile_and_time(unet, inputs, args.runs, cuda, flags)
            if reference is None:
                reference = found["output"]
            row = {"variant": label, "step_ms": round(found["step_ms"], 2), "compile_s": round(found["compile_s"], 1),
                   "relative_error_vs_first": round(relative_error(found["output"], reference), 6),
                   "finite": found["finite"]}
            summary["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / "sdxl_unet_levers.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "sdxl_unet_levers.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
