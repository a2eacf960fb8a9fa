"""Issue 17: what one FP8 GEMM costs the host. The 2026-12-08 profile of SDXL's compiled UNet with FP8 Linears
(BENCHMARKS.md) found 33-38 ms of kernels in 70-93 ms steps: the GPU waits for the host, and the FP8 steps wait
more than the fp16 one. This times, per GEMM at SDXL's and FLUX.1's shapes, the host's microseconds to issue one
call (200 calls back to back, no wait for the GPU in between) and the GPU's (CUDA events), for a 16-bit matmul and
torch._scaled_mm with row-wise (what Fp8Linear calls) and tensor-wise scales.

    python3 scripts/gpu_scaled_mm_host.py --out $OUT            # on the lent GPU; seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # (rows, in, out)
    "SDXL ff.proj at 64x64 latents, CFG": (8192, 640, 5120),
    "SDXL ff.proj at 32x32 latents, CFG": (2048, 1280, 10240),
    "SDXL attn.to_q at 32x32 latents, CFG": (2048, 1280, 1280),
    "FLUX.1 attn.to_q, 1024x1024": (4608, 3072, 3072),
}


def host_and_gpu_us(fn, calls: int = 200) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    began = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    host = (time.perf_counter() - began) / calls * 1e6
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) * 1000 / calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, (m, k, n) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        row_a, row_b = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        one = torch.ones((), device="cuda")
        variants = {
            "fp16 matmul": lambda: x @ w.t(),
            "_scaled_mm row-wise, bf16 out": lambda: torch._scaled_mm(x8, w8.t(), scale_a=row_a, scale_b=row_b,
                                                                      out_dtype=torch.bfloat16),
            "_scaled_mm tensor-wise, fp16 out": lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                                         out_dtype=torch.float16),
        }
        for name, fn in variants.items():
            try:
                host, gpu = host_and_gpu_us(fn)
                rows.append({"shape": label, "gemm": name, "host_us": round(host, 1), "gpu_us": round(gpu, 1)})
            except RuntimeError as exc:  # e.g. a scale layout this torch refuses
                rows.append({"shape": label, "gemm": name, "error": str(exc).splitlines()[0][:200]})
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "scaled_mm_host.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
