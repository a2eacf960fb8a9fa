"""Issue 17's FP8-attention lever, measured alone at FLUX.1's shape before any model work: cuDNN's FP8 SDPA
(through nvidia-cudnn-frontend, the wheel carried in .whl) against torch's bf16 SDPA on the same card.

    python3 scripts/gpu_fp8_attention.py --out $OUT     # on the lent GPU (Hopper: FP8 output, dequantized here)

Q, K, V come as diffusers' Flux attention hands them over: bf16, [batch, tokens, heads, 128], 4608 tokens at
1024x1024 (4096 image + 512 text). Rows (CUDA events, medians):
- torch SDPA bf16 (what runs today: cuDNN flash on this card, see BENCHMARKS.md's profile);
- cuDNN FP8 kernel alone (inputs quantized beforehand): the ceiling of the lever;
- cuDNN FP8 with per-tensor quantization of Q, K, V (amax, scale, cast) and the output's dequantization: what
  a model call would pay, eager and with the quantization compiled.
Each output is compared with float32 attention on the same inputs (relative L2 error), next to the bf16 SDPA's
own error, for inputs of two shapes: unit-normal, and "peaky" (Q and K scaled 4x, as RMSNorm'd Flux queries
with large learned gains make softmax concentrate on a few tokens; small probabilities are where FP8 P loses).
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

from gpu_profile_step import timed  # noqa: E402

FP8_MAX = 448.0
# P (the softmax probabilities, at most 1) is multiplied by this before its FP8 cast: a power of two that keeps
# 1.0 in range with headroom, and keeps probabilities down to ~1e-5 (2^-9 / 256) from flushing to zero.
SOFTMAX_SCALE = 256.0


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and their descale (x ~= values * descale), with a power-of-two scale so scaling is exact."""
    amax = x.abs().amax().float().clamp_min(1e-8)
    multiplier = torch.exp2(torch.floor(torch.log2(FP8_MAX / amax)))
    return (x.float() * multiplier).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), multiplier.reciprocal().reshape(1, 1, 1, 1)


class CudnnFp8Attention:
    """One cuDNN FP8 SDPA plan for one [batch, tokens, heads, dim] shape; FP8 output (Hopper has no other)."""

    def __init__(self, shape: tuple[int, int, int, int], scale: float, device: torch.device):
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        batch, tokens, heads, dim = shape
        self.shape = shape
        dims = (batch, heads, tokens, dim)  # cuDNN's order; the strides keep diffusers' [b, s, h, d] memory
        strides = (tokens * heads * dim, dim, heads * dim, 1)
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=self.handle)
        self.q, self.k, self.v = (g.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in "qkv")
        scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
        self.dq, self.dk, self.dv, self.ds, self.ss, self.so = (
            g.tensor(name=n, **scalar) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"))
        self.o, _, self.amax_s, self.amax_o = g.sdpa_fp8(
            q=self.q, k=self.k, v=self.v, descale_q=self.dq, descale_k=self.dk, descale_v=self.dv,
            descale_s=self.ds, scale_s=self.ss, scale_o=self.so, attn_scale=scale, use_causal_mask=False,
            generate_stats=False)
        self.o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
        for amax in (self.amax_s, self.amax_o):
            amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        self.workspace = torch.empty(g.get_workspace_size(), dtype=torch.uint8, device=device)
        self.softmax_scale = torch.full((1, 1, 1, 1), SOFTMAX_SCALE, device=device)
        self.softmax_descale = self.softmax_scale.reciprocal()
        self.amax_out = [torch.empty((1, 1, 1, 1), device=device) for _ in range(2)]

    def run_fp8(self, q8, k8, v8, dq, dk, dv, out_scale) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=torch.float8_e4m3fn, device=q8.device)
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        self.graph.execute({self.q: q8, self.k: k8, self.v: v8, self.dq: dq, self.dk: dk, self.dv: dv,
                            self.ds: self.softmax_descale, self.ss: self.softmax_scale, self.so: out_scale,
                            self.o: out, self.amax_s: self.amax_out[0], self.amax_o: self.amax_out[1]},
                           self.workspace, handle=self.handle)
        return out

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quantize=quantize_per_tensor) -> torch.Tensor:
        (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
        # |O| <= max|V| (each output row is a convex mix of V's rows), so V's own scale keeps O in range.
        out_scale = dv.reciprocal()
        return (self.run_fp8(q8, k8, v8, dq, dk, dv, out_scale).float() * dv).to(torch.bfloat16)


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
        attention = CudnnFp8Attention(shape, scale, device)
    except Exception as exc:  # the verdict "not available here" is a result too
        summary["unavailable"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(summary, indent=2))
        (out / "fp8_attention.json").write_text(json.dumps(summary, indent=2) + "\n")
        return 1
    compiled_quantize = torch.compile(quantize_per_tensor)
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
        kernel = lambda: attention.run_fp8(q8, k8, v8, dq, dk, dv, dv.reciprocal())  # noqa: E731
        for _ in range(3):
            kernel()
        rows["cuDNN FP8 kernel alone"] = (timed(kernel, args.runs), error((kernel().float() * dv).to(torch.bfloat16)))
        rows["cuDNN FP8 + quantize (eager)"] = (timed(lambda: attention(q, k, v), args.runs), error(attention(q, k, v)))
        for _ in range(3):
            attention(q, k, v, compiled_quantize)
        rows["cuDNN FP8 + quantize (compiled)"] = (timed(lambda: attention(q, k, v, compiled_quantize), args.runs),
                                                   error(attention(q, k, v, compiled_quantize)))
        summary[label] = {name: {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "relative_error_vs_fp32": round(err, 5)}
                          for name, (ms, err) in rows.items()}
        for name, (ms, err) in rows.items():
            print(f"{label:16s} {name:34s} {ms:7.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s  rel. error {err:.5f}", flush=True)
    (out / "fp8_attention.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
