"""Issue 17's FP8-attention lever, measured alone at FLUX.1's shape before any model work: cuDNN's FP8 SDPA
(through nvidia-cudnn-frontend, the wheel carried in .whl) against torch's bf16 SDPA on the same card.

    python3 scripts/gpu_fp8_attention.py --out $OUT     # on the lent GPU (Hopper: FP8 output, dequantized here)

Q, K, V come as diffusers' Flux attention hands them over: bf16, [batch, tokens, heads, 128], 4608 tokens at
1024x1024 (4096 image + 512 text). Rows (CUDA events, medians):
- torch SDPA bf16 (what runs today: cuDNN flash on this card, see BENCHMARKS.md's profile);
- cuDNN FP8 kernel alone (inputs quantized beforehand): the ceiling of the lever;
- cuDNN FP8 with per-tensor quantization of Q, K, V (amax, scale, cast) and the output's dequantization: what
  a model call would pay, eager and with the quantization compiled.
The plan and the quantization are the app's own (pipelines/fp8_attention.py). Each output is compared with
float32 attention on the same inputs (relative L2 error), next to the bf16 SDPA's own error, for inputs of two
shapes: unit-normal, and "peaky" (Q and K scaled 4x, as RMSNorm'd Flux queries with large learned gains make
softmax concentrate on a few tokens; small probabilities are where FP8 P loses).
Writes OUT/fp8_attention.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_step import timed  # noqa: E402
from pipelines.fp8_attention import SOFTMAX_SCALE, cudnn_plan, fp8_attention, quantize_per_tensor  # noqa: E402

def sdpa_bf16(q, k, v, scale):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4608)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    shape = (1, args.tokens, args.heads, args.dim)
    scale = 1 / math.sqrt(args.dim)
    flops = 4 * args.tokens * args.tokens * args.heads * args.dim  # two GEMMs, 2 FLOPs a multiply-add
    summary: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape_bshd": list(shape),
                     "date": time.strftime("%Y-%m-%d"), "softmax_scale": SOFTMAX_SCALE}
    try:
        import cudnn
        summary["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
        summary["cudnn_backend"] = cudnn.backend_version_string()
        plan = cudnn_plan(shape, scale, device)
    except Exception as exc:  # the verdict "not available here" is a result too
        summary["unavailable"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(summary, indent=2))
        (out / "fp8_attention.json").write_text(json.dumps(summary, indent=2) + "\n")
        return 1
    compiled = torch.compile(fp8_attention)  # quantize and dequantize fused by inductor, as in the compiled model
    gen = torch.Generator(device="cuda").manual_seed(0)
    for label, gain in (("unit-normal", 1.0), ("peaky (Q, K x4)", 4.0)):
        q, k, v = (torch.randn(shape, generator=gen, device=device) for _ in range(3))
        q, k = q * gain, k * gain
        reference = sdpa_bf16(q, k, v, scale)  # float32 inputs: a float32 kernel, the reference
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        error = lambda o: ((o.float() - reference).norm() / reference.norm()).item()  # noqa: E731
        rows = {}
        rows["torch SDPA bf16"] = (timed(lambda: sdpa_bf16(q, k, v, scale), args.runs), error(sdpa_bf16(q, k, v, scale)))
        (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(x) for x in (q, k, v))
        kernel = lambda: plan.run(q8, k8, v8, dq, dk, dv)  # noqa: E731
        for _ in range(3):
            kernel()
        rows["cuDNN FP8 kernel alone"] = (timed(kernel, args.runs), error((kernel().float() * dv).to(torch.bfloat16)))
        rows["cuDNN FP8 + quantize (eager)"] = (timed(lambda: fp8_attention(q, k, v, scale), args.runs),
                                                error(fp8_attention(q, k, v, scale)))
        for _ in range(3):
            compiled(q, k, v, scale)
        rows["cuDNN FP8 + quantize (compiled)"] = (timed(lambda: compiled(q, k, v, scale), args.runs),
                                                   error(compiled(q, k, v, scale)))
        summary[label] = {name: {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "relative_error_vs_fp32": round(err, 5)}
                          for name, (ms, err) in rows.items()}
        for name, (ms, err) in rows.items():
            print(f"{label:16s} {name:34s} {ms:7.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s  rel. error {err:.5f}", flush=True)
    (out / "fp8_attention.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
