"""Where a compiled denoiser step goes, kernel by kernel, and what row-wise activation quantization costs.

    python scripts/gpu_profile_step.py --out OUT_DIR [--model flux.1-dev] [--precision fp8] [--size 1024]
    python scripts/gpu_profile_step.py --out OUT_DIR --model sdxl-base-1.0 --precision fp16 --skip-quant

1. Prism's own denoiser as the app loads it (random full-size weights, quantized, compiled as the app compiles
   it; SDXL with its fused QKV, one CFG step at batch 2): median step time over 10 steps (CUDA events), then a
   torch.profiler trace of 2 steps, kernels grouped into GEMM / convolution / attention / quantization / other,
   with the 25 most expensive kernels.
2. Row-wise FP8 quantization of activations alone (amax per row, scale, cast), at the shapes a Flux step
   feeds its Linear layers: eager, torch.compile, and a Triton kernel that reads each row once; GB/s each.
Writes OUT_DIR/profile.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.backends.contract import TorchOptions  # noqa: E402
from pipelines.backends.torch_backend import TorchBackend  # noqa: E402
from pipelines.config import default_engine_cache  # noqa: E402
from pipelines.device_policy import DevicePolicy  # noqa: E402
from pipelines.gpu import probe_device  # noqa: E402
from pipelines.loading import WeightSource  # noqa: E402
from pipelines.precision import Precision  # noqa: E402
from pipelines.quant import FP8_MAX  # noqa: E402
from pipelines.registry import Family, resolve_spec  # noqa: E402


def flux_inputs(spec, size: int, dtype: torch.dtype, device: str = "cuda", seed: int = 0, timestep: float = 0.5) -> dict:
    """One FLUX.1 transformer call's inputs at `size` (random latents and text, the given timestep)."""
    cfg = spec.components["transformer"].config
    tokens, text = (size // 16) ** 2, spec.max_prompt_tokens
    g = torch.Generator(device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    inputs = dict(hidden_states=r(1, tokens, cfg["in_channels"]), encoder_hidden_states=r(1, text, cfg["joint_attention_dim"]),
                  pooled_projections=r(1, cfg["pooled_projection_dim"]),
                  timestep=torch.full((1,), timestep, device=device, dtype=dtype),
                  img_ids=torch.zeros(tokens, 3, device=device, dtype=dtype), txt_ids=torch.zeros(text, 3, device=device, dtype=dtype))
    if cfg.get("guidance_embeds"):
        inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=torch.float32)
    return inputs


def sdxl_inputs(spec, size: int, dtype: torch.dtype, device: str = "cuda") -> dict:
    """One classifier-free-guidance step of SDXL's UNet as the app's loop calls it (unconditional and conditional
    halves: batch 2), random latents and text."""
    cfg = spec.components["unet"].config
    g = torch.Generator(device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    latent, pooled = size // spec.vae_scale_factor, cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return dict(sample=r(2, cfg["in_channels"], latent, latent), timestep=torch.tensor(500.0, device=device),
                encoder_hidden_states=r(2, 77, cfg["cross_attention_dim"]), text_embeds=r(2, pooled),
                time_ids=torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype))


def timed(fn, runs: int, cuda: bool = True) -> float:
    """Median milliseconds of `fn` over `runs` calls: CUDA events on a GPU, the wall clock on a CPU."""
    times = []
    for _ in range(runs):
        if not cuda:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1000)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def kind_of(name: str) -> str:
    """Inductor names a fused kernel after every op in it ("triton_red_fused__scaled_mm_..._amax_..."), so
    Triton kernels are sorted by what they compute before library kernels are by their names."""
    n = name.lower()
    if n.startswith("triton"):
        return "triton: activation quantization + fused epilogues" if "amax" in n else "triton: norms, RoPE, elementwise"
    if "flash" in n or "fmha" in n or "sdpa" in n or "attention" in n:  # before convolutions: cuDNN's SDPA is "fprop"
        return "attention"
    if "fprop" in n or "conv" in n or "dgrad" in n:  # cuDNN's convolution kernels (SDXL's UNet and VAE)
        return "convolution"
    if "gemm" in n or "cutlass" in n or "xmma" in n or "nvjet" in n:
        return "gemm"
    return "other"


def kernel_profile(step, kernel_list: Path, steps: int = 2) -> dict:
    """torch.profiler over `steps` calls of `step` (already compiled and warm): GPU milliseconds a call, by kernel
    group and for the 25 most expensive kernels; every kernel goes to `kernel_list`."""
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name].append(e.device_time / 1000 / steps)  # ms per call
    rows = sorted(((sum(v), len(v) // steps, k) for k, v in per_kernel.items()), reverse=True)
    groups: dict[str, float] = defaultdict(float)
    for total, _, name in rows:
        groups[kind_of(name)] += total
    kernel_list.write_text("\n".join(f"{t:8.3f} ms {c:5d}x {n[:200]}" for t, c, n in rows))
    return {"kernel_ms_per_step": round(sum(r[0] for r in rows), 2), "kernels_per_step": sum(r[1] for r in rows),
            "groups_ms": {k: round(v, 2) for k, v in groups.items()},
            "top": [{"ms": round(t, 3), "calls": c, "kernel": n[:160]} for t, c, n in rows[:25]]}


def profile_step(args, out: Path) -> dict:
    spec = resolve_spec(args.model)
    info = probe_device("cuda")
    policy = DevicePolicy.for_info(info)
    # the app's compile cache, so a call after the app's own rows (scripts/gpu_speed_levers.py) reuses its kernels
    backend = TorchBackend(TorchOptions(compile=not args.no_compile,
                                        compile_cache_dir=default_engine_cache() / "torch-inductor"))
    loaded = backend.load(spec, spec.denoiser, Precision.parse(args.precision), "cuda", policy,
                          WeightSource(random_weights=True))
    denoiser = loaded.obj
    make_inputs = sdxl_inputs if spec.family is Family.SDXL else flux_inputs
    inputs = make_inputs(spec, args.size, loaded.dtype)
    with torch.inference_mode():
        for _ in range(3):  # compile + warm
            denoiser(**inputs)
        torch.cuda.synchronize()
        step_ms = timed(lambda: denoiser(**inputs), 10)
    kernels = kernel_profile(lambda: denoiser(**inputs), out / "profile-kernels.txt")
    summary = {"model": spec.id, "precision": args.precision, "size": args.size, "runs_as": loaded.runs_as,
               "step_ms": round(step_ms, 2), **kernels}
    del denoiser, loaded
    torch.cuda.empty_cache()
    return summary


def quant_eager(x: torch.Tensor):
    scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quant_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, q_ptr, s_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(q_ptr + row * n_cols + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, scale)

    def run(x: torch.Tensor):
        m, k = x.shape
        q = torch.empty_like(x, dtype=torch.float8_e4m3fn)
        s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(k)
        kernel[(m,)](x, q, s, k, BLOCK=block, num_warps=8 if block >= 4096 else 4)
        return q, s

    return run


def quant_bench() -> list[dict]:
    shapes = [(4608, 3072), (4096, 12288), (4608, 15360), (512, 3072)]
    compiled = torch.compile(quant_eager, dynamic=False)
    try:
        tri = quant_triton()
    except Exception as exc:  # noqa: BLE001 - report, do not stop the profile
        tri, why = None, repr(exc)
    rows = []
    for m, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
        ref_q, ref_s = quant_eager(x)
        row = {"shape": f"{m}x{k}"}
        variants = {"eager": quant_eager, "compiled": compiled}
        if tri is not None:
            variants["triton"] = tri
        for label, fn in variants.items():
            with torch.inference_mode():
                for _ in range(3):
                    fn(x)
                ms = timed(lambda: fn(x), 50)
                q, s = fn(x)
            moved = x.numel() * 3 + m * 4  # read bf16, write fp8 and a scale per row
            same = bool(torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))) and bool(torch.allclose(s, ref_s))
            row[label] = {"us": round(ms * 1000, 1), "GB/s": round(moved / ms / 1e6), "matches_eager": same}
        if tri is None:
            row["triton"] = why
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="flux.1-dev")
    p.add_argument("--precision", default="fp8")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--skip-quant", action="store_true", help="only the step profile (e.g. SDXL at 16 bits)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    if not args.skip_quant:
        result["quant"] = quant_bench()
        print(json.dumps(result["quant"], indent=1), flush=True)
    if not args.skip_step:
        result["step"] = profile_step(args, out)
        print(json.dumps(result["step"], indent=1), flush=True)
    (out / "profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
