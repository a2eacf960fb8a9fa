"""FP8 attention for the PyTorch backend: cuDNN's FP8 flash attention, through nvidia-cudnn-frontend.

Why: a compiled FLUX.1 FP8 step on the H200 spends 25 of its ~106 ms in bf16 attention at ~580 TFLOP/s
(torch profiler, BENCHMARKS.md "Where a compiled Flux FP8 step goes"), and torch has no FP8 attention of its own
on Hopper (its experimental FA3 path needs a separately built `flash_attn_interface`). cuDNN has one; the
frontend's Python graph API is the way to call it (scripts/gpu_fp8_attention.py measures it alone).
Measured on an H100 (2026-12-07, BENCHMARKS.md): the kernel is 1.26x bf16 SDPA at FLUX.1's shape, and the step
gains 2% once quantizing Q, K, V and dequantizing O are paid for, so the lever is off by default.

The arithmetic, as the kernel does it and `emulate_sdpa_fp8` repeats on any device:
- Q, K, V are each quantized with one power-of-two scale per tensor (so scaling is exact), amax / 448 or less.
  Written in plain torch ops, so inductor fuses the amax and the cast into the kernels producing Q, K, V.
- The softmax probabilities P are multiplied by 256 before their FP8 cast (P <= 1 stays in range; values down
  to ~1e-5 survive), and divided back inside the kernel.
- The output is FP8 too on Hopper (cuDNN has no other output type there); each output row is a convex mix of V's
  rows, so |O| <= max|V| and V's own scale keeps O in range. It is dequantized to 16 bits right after.
"""
from __future__ import annotations

import functools
import math

import torch

FP8_MAX = 448.0
SOFTMAX_SCALE = 256.0
# cuDNN's FP8 SDPA needs Hopper or newer; older GPUs are refused before any plan is built, newer ones are probed.
CUDNN_FP8_SDPA_MIN_CAPABILITY = (9, 0)


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, descale) with x ~= values * descale; descale is a power of two, as a (1, 1, 1, 1) float32."""
    amax = x.abs().amax().float().clamp_min(1e-8)
    multiplier = torch.exp2(torch.floor(torch.log2(FP8_MAX / amax)))
    values = (x.float() * multiplier).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, multiplier.reciprocal().reshape(1, 1, 1, 1)


def emulate_sdpa_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                     descale_k: torch.Tensor, descale_v: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel's arithmetic in float32 ([batch, tokens, heads, dim] in, FP8 output at V's scale out): what runs
    on a CPU, so the demo models show FP8 attention's image difference there too. As in a flash kernel, P is
    quantized before it is normalized (exp(s - row max), at most 1) and the row sums come from the unquantized P."""
    q, k, v = (t.float().transpose(1, 2) * d for t, d in ((q8, descale_q), (k8, descale_k), (v8, descale_v)))
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    p8 = (p * SOFTMAX_SCALE).to(torch.float8_e4m3fn).float() / SOFTMAX_SCALE
    out = (p8 @ v) / p.sum(dim=-1, keepdim=True) / descale_v
    return out.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).transpose(1, 2).contiguous()


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  sdpa_fp8=None) -> torch.Tensor:
    """softmax(Q K^T * scale) V for [batch, tokens, heads, dim] inputs, computed in FP8; the result in q's dtype.
    `sdpa_fp8` is the kernel (default: the `prism::sdpa_fp8` op: cuDNN's on a GPU, the emulation on a CPU)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    kernel = torch.ops.prism.sdpa_fp8 if sdpa_fp8 is None else sdpa_fp8
    (q8, dq), (k8, dk), (v8, dv) = quantize_per_tensor(q), quantize_per_tensor(k), quantize_per_tensor(v)
    out = kernel(q8, k8, v8, dq, dk, dv, scale)
    return (out.float() * dv).to(q.dtype)


class _CudnnPlan:
    """One built cuDNN FP8 SDPA graph for one input shape on one device."""

    def __init__(self, shape: tuple[int, int, int, int], scale: float, device: torch.device):
        import cudnn

        self.cudnn = cudnn
        batch, tokens, heads, dim = shape
        self.shape = shape
        self.handle = cudnn.create_handle()
        dims = (batch, heads, tokens, dim)  # cuDNN's order; these strides keep the [b, s, h, d] memory
        strides = (tokens * heads * dim, dim, heads * dim, 1)
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=self.handle)
        self.q, self.k, self.v = (g.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in "qkv")
        one = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
        self.dq, self.dk, self.dv, self.ds, self.ss, self.so = (
            g.tensor(name=n, **one) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"))
        self.o, _, amax_s, amax_o = g.sdpa_fp8(
            q=self.q, k=self.k, v=self.v, descale_q=self.dq, descale_k=self.dk, descale_v=self.dv,
            descale_s=self.ds, scale_s=self.ss, scale_o=self.so, attn_scale=scale, use_causal_mask=False,
            generate_stats=False)
        self.o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
        self.amax = []
        for amax in (amax_s, amax_o):  # the kernel reports both ranges; nothing here reads them
            amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
            self.amax.append(amax)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        self.workspace = torch.empty(g.get_workspace_size(), dtype=torch.uint8, device=device)
        self.softmax_scale = torch.full((1, 1, 1, 1), SOFTMAX_SCALE, device=device)
        self.softmax_descale = self.softmax_scale.reciprocal()
        self.amax_out = [torch.empty((1, 1, 1, 1), device=device) for _ in self.amax]

    def run(self, q8, k8, v8, dq, dk, dv) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=torch.float8_e4m3fn, device=q8.device)
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        pack = {self.q: q8, self.k: k8, self.v: v8, self.dq: dq, self.dk: dk, self.dv: dv, self.ds: self.softmax_descale,
                self.ss: self.softmax_scale, self.so: dv.reciprocal(), self.o: out}
        pack.update(zip(self.amax, self.amax_out))
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return out


@functools.lru_cache(maxsize=32)  # one plan per (shape, scale, device): a new image size builds one, in ~0.1 s
def cudnn_plan(shape: tuple[int, int, int, int], scale: float, device: torch.device) -> _CudnnPlan:
    return _CudnnPlan(shape, scale, device)


# A torch op, so torch.compile traces through it (the fake implementation gives the output's shape and type).
@torch.library.custom_op("prism::sdpa_fp8", mutates_args=(), device_types="cuda")
def sdpa_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
             descale_v: torch.Tensor, scale: float) -> torch.Tensor:
    q8, k8, v8 = q8.contiguous(), k8.contiguous(), v8.contiguous()
    return cudnn_plan(tuple(q8.shape), scale, q8.device).run(q8, k8, v8, descale_q, descale_k, descale_v)


sdpa_fp8.register_kernel("cpu")(emulate_sdpa_fp8)


@sdpa_fp8.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, scale):
    return torch.empty(q8.shape, dtype=torch.float8_e4m3fn, device=q8.device)


@functools.lru_cache(maxsize=8)  # probed once per device and process
def fp8_attention_problem(device: str | torch.device) -> str | None:
    """Why FP8 attention cannot run on `device` (None: it can). A CPU runs the emulation. On a GPU this builds and
    runs a small cuDNN plan and checks its output against float32 attention, so a cuDNN that accepts the graph
    but computes something else is caught."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"not on {device.type}: cuDNN's kernel needs an NVIDIA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < CUDNN_FP8_SDPA_MIN_CAPABILITY:
        return f"cuDNN's FP8 attention needs compute capability 9.0 or newer; this GPU is {major}.{minor}"
    try:
        import cudnn  # noqa: F401
    except Exception as exc:
        return f"nvidia-cudnn-frontend does not import ({type(exc).__name__}); pip install nvidia-cudnn-frontend"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 128, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
    try:
        got = fp8_attention(q, k, v)
    except Exception as exc:
        return f"cuDNN refused the FP8 attention graph ({type(exc).__name__}: {str(exc)[:200]})"
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
    error = ((got.float() - want).norm() / want.norm()).item()
    if not math.isfinite(error) or error > 0.1:  # FP8's own error is a few percent; a wrong layout is ~100%
        return f"cuDNN's FP8 attention gave wrong results here (relative error {error:.3f} against float32)"
    return None


def fp8_attention_label(device: str | torch.device) -> str:
    return "FP8 attention" if torch.device(device).type == "cuda" else "FP8 attention (CPU emulation)"
