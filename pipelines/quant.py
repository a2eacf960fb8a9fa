"""FP8 and NVFP4 Linear layers for the PyTorch backend.

Why our own modules rather than torchao: torchao's float8 config refuses to run without a CUDA
GPU of compute capability >= 8.9 (AssertionError on the CPU, measured with torchao 0.18), and the
issue asks for one code path whose numerics tests can check on a CPU. `torch._scaled_mm` with
row-wise scales runs on both the CPU and Hopper/Blackwell, so FP8 uses it everywhere.

- FP8: e4m3 weights with one scale per output channel; activations quantized per row at run time.
- NVFP4: e2m1 values in blocks of 16 along the input dimension, one e4m3 scale per block and one
  fp32 scale per tensor. Without FP4 tensor cores the weights are expanded to 16 bits at the matmul
  ("FP4 weights, 16-bit compute": less memory, not faster). With them (Blackwell) torchao's NVFP4
  tensor subclass runs the native block-scaled GEMM.

Models keep their sensitive layers in 16 bits (embedders, first/last projections; see
`keep_16bit`), as the TensorRT demo and ModelOpt recipes do.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .precision import Precision

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest e2m1 value
FP4_BLOCK = 16
# The eight non-negative e2m1 values, in code order (code = sign << 3 | index).
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_FP4_MIDPOINTS = (FP4_VALUES[1:] + FP4_VALUES[:-1]) / 2


def gemm_output_dtype(compute_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """What Fp8Linear's row-wise GEMM writes: fp16 for fp16 compute (SDXL) on a CUDA GPU whose torch writes it,
    else bf16, the one output every torch's row-wise GEMM has. Why: with bf16 out, SDXL at FP8 ran 400 cast
    kernels a step before its attention inputs (the 2026-12-08 profile, BENCHMARKS.md), in steps whose GPU
    already waits on the host's launches, and rounded each output to 8 bits of mantissa where fp16 keeps 11.
    Its speed is still to be measured on a GPU (scripts/gpu_sdxl_fp8_layers.py)."""
    device = torch.device(device)
    if compute_dtype is torch.float16 and device.type == "cuda" and _rowwise_fp16_output(device.index or 0):
        return torch.float16
    return torch.bfloat16


@functools.cache
def _rowwise_fp16_output(device_index: int) -> bool:
    """Whether this CUDA device's torch writes fp16 from a row-wise scaled GEMM: torch builds that reach cuBLASLt
    12.9+ on Hopper do; older ones, and other GPUs' CUTLASS path in some versions, refuse. Asked once per device."""
    device = torch.device("cuda", device_index)
    a = torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                         out_dtype=torch.float16)
    except (RuntimeError, ValueError):  # torch's "only bf16 ... for row-wise scaling" (ValueError since 2.9)
        return False
    return True


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in e4m3 (per-output-channel scale) and x quantized per row on the fly, or with one
    calibrated scale for the whole input when `set_input_amax` gave one (`pipelines/fp8_static.py` says why)."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype, gemm_out_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = weight_fp8.shape[1]
        self.out_features = weight_fp8.shape[0]
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float())  # (1, N) as _scaled_mm wants
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        # What the GEMM writes (the CPU emulation rounds to it too); None: chosen for the weight's device
        self.gemm_out_dtype = gemm_out_dtype or gemm_output_dtype(compute_dtype, weight_fp8.device)
        self.register_buffer("input_scale", None)  # (1, 1) fp32 when calibrated; None: per-row scales at run time

    def set_input_amax(self, amax: float | None) -> None:
        """Quantize inputs with amax / FP8_MAX from now on (values beyond amax clip); None: per row again."""
        device = self.weight_fp8.device
        self.input_scale = None if amax is None else torch.full((1, 1), max(amax, 1e-12) / FP8_MAX, device=device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> "Fp8Linear":
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        w_fp8 = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(w_fp8, scale, None if linear.bias is None else linear.bias.detach(), compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.input_scale is None:
            x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        else:  # the row-wise GEMM below still takes a scale per row: the one scale, repeated
            x_scale = self.input_scale.expand(x2.shape[0], 1).contiguous()
        x_fp8 = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if x.is_cuda:
            # Row-wise scaled GEMM on the FP8 tensor cores, written in gemm_out_dtype (gemm_output_dtype says which)
            y = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                 out_dtype=self.gemm_out_dtype).to(x.dtype)
        else:
            # CPU emulation of the same arithmetic: the FP8 products are exact in fp32, accumulated in fp32.
            # (torch < 2.12 has no row-wise _scaled_mm on the CPU.)
            y = ((x_fp8.float() * x_scale) @ (self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)).t())
            y = y.to(self.gemm_out_dtype).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        inputs = "per-row inputs" if self.input_scale is None else "calibrated input scale"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 per-channel, {inputs}"


@dataclass(frozen=True)
class Nvfp4Weight:
    packed: torch.Tensor  # uint8 (N, K/2): two e2m1 codes per byte, even element in the low nibble
    block_scale: torch.Tensor  # float8_e4m3fn (N, K/16)
    tensor_scale: torch.Tensor  # float32 scalar


def nvfp4_quantize(w: torch.Tensor) -> Nvfp4Weight:
    n, k = w.shape
    if k % FP4_BLOCK:
        raise ValueError(f"NVFP4 needs the input dimension to be a multiple of {FP4_BLOCK}; got {k}")
    w = w.detach().float()
    tensor_scale = (w.abs().amax() / (FP4_MAX * FP8_MAX)).clamp(min=1e-12)
    blocks = w.reshape(n, k // FP4_BLOCK, FP4_BLOCK)
    block_scale = (blocks.abs().amax(dim=2) / FP4_MAX / tensor_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    divisor = block_scale.float() * tensor_scale
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    scaled = (blocks / divisor[..., None]).clamp(-FP4_MAX, FP4_MAX)
    index = torch.bucketize(scaled.abs(), _FP4_MIDPOINTS.to(w.device))  # round to the nearest e2m1 value
    codes = (index | ((scaled < 0).to(torch.int64) << 3)).to(torch.uint8).reshape(n, k)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return Nvfp4Weight(packed.contiguous(), block_scale.contiguous(), tensor_scale)


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 2): the two e2m1 values every packed byte holds, low nibble first."""
    codes = torch.arange(256, device=device)
    table = torch.cat([FP4_VALUES, -FP4_VALUES]).to(device)
    return torch.stack([table[codes & 0xF], table[codes >> 4]], dim=-1).to(dtype)


def nvfp4_dequantize(q: Nvfp4Weight, dtype: torch.dtype) -> torch.Tensor:
    # One table lookup per byte (int32 indices) rather than unpacking nibbles into int64 codes: the
    # weight-only path runs this for every layer on every step, so fewer and smaller temporaries matter.
    # Building the values from the codes' bits instead (no gather) was no faster compiled on an H100 and 8x
    # slower eager on a CPU (BENCHMARKS.md, 2026-12-07).
    n = q.packed.shape[0]
    values = _byte_table(q.packed.device, dtype)[q.packed.int()].reshape(n, -1, FP4_BLOCK)
    scale = (q.block_scale.float() * q.tensor_scale).to(dtype)
    return (values * scale[..., None]).reshape(n, -1)


class Nvfp4WeightOnlyLinear(nn.Module):
    """NVFP4-stored weights expanded to 16 bits at each call: memory of FP4, speed of 16-bit (or a bit less)."""

    def __init__(self, q: Nvfp4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.packed.shape[0], q.packed.shape[1] * 2
        self.register_buffer("packed", q.packed)
        self.register_buffer("block_scale", q.block_scale)
        self.register_buffer("tensor_scale", q.tensor_scale.reshape(()))
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> "Nvfp4WeightOnlyLinear":
        return cls(nvfp4_quantize(linear.weight), None if linear.bias is None else linear.bias.detach(), compute_dtype)

    def weight_16bit(self, dtype: torch.dtype) -> torch.Tensor:
        return nvfp4_dequantize(Nvfp4Weight(self.packed, self.block_scale, self.tensor_scale), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_16bit(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nvfp4 weights, 16-bit compute"


def _torchao_native_nvfp4(linear: nn.Linear) -> nn.Module:
    """Native NVFP4 GEMM on Blackwell through torchao (W4A4, dynamic activation scales)."""
    from torchao.quantization import quantize_
    from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig

    holder = nn.Sequential(linear)
    quantize_(holder, NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=False))
    return holder[0]


@dataclass(frozen=True)
class QuantReport:
    precision: Precision
    quantized: int  # Linear layers replaced
    kept: tuple[str, ...]  # Linear layers left in 16 bits, by name
    bytes_before: int
    bytes_after: int
    native_fp4: bool = False


def module_bytes(module: nn.Module) -> int:
    """Bytes of the module's weights, memory shared by two tensors counted once (SDXL's fused attention
    projections are views into one weight: pipelines/families/sdxl_attention.py)."""
    total, spans = 0, {}
    for t in [*module.parameters(), *module.buffers()]:
        size = t.numel() * t.element_size()
        if t.data_ptr() == 0:  # no memory behind it (meta), or empty
            total += size
        else:
            spans.setdefault(t.device, []).append((t.data_ptr(), t.data_ptr() + size))
    for ranges in spans.values():
        end = 0
        for start, stop in sorted(ranges):  # the union of the address ranges
            if stop > end:
                total += stop - max(start, end)
                end = stop
    return total


def quantizable(name: str, in_features: int, out_features: int, keep_16bit: Iterable[str]) -> bool:
    """The one rule for which Linear layers FP8/FP4 replace: all but those under a kept top-level module
    (`name` is the layer's path in the model) and those whose sides are not multiples of 16, which
    neither the FP8 GEMM nor FP4 blocks take."""
    return name.split(".")[0] not in set(keep_16bit) and in_features % 16 == 0 and out_features % 16 == 0


def quantizable_linears(model: nn.Module, keep_16bit: Iterable[str]) -> list[str]:
    """Names (relative to `model`) of the Linear layers FP8/FP4 replace."""
    keep = tuple(keep_16bit)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and quantizable(name, m.in_features, m.out_features, keep)]


def quantize_linears(model: nn.Module, precision: Precision, keep_16bit: Iterable[str],
                     compute_dtype: torch.dtype, native_fp4: bool = False,
                     device: torch.device | str | None = None,
                     bases: dict[str, torch.Tensor] | None = None) -> QuantReport:
    """Replace the model's nn.Linear layers in place with FP8 / NVFP4 ones.

    `keep_16bit` names top-level submodules (e.g. "x_embedder") whose layers stay 16-bit (`quantizable`).
    With `device`, a model staged elsewhere (host RAM) moves there one layer at a time as it is converted,
    so the device never holds the whole 16-bit model: Flux FP8 loads on a GPU too small for Flux in bf16.
    With `bases`, each replaced layer's 16-bit weight is copied there (host RAM) first: what LoRAs are
    fused into and re-quantized from (pipelines/backends/torch_lora.py).
    """
    precision = Precision.parse(precision)
    before = module_bytes(model)
    if precision.is_16bit:
        return QuantReport(precision, 0, (), before, before)
    targets = set(quantizable_linears(model, keep_16bit))
    kept: list[str] = []
    count = 0
    for name, linear in list(model.named_modules()):
        if not isinstance(linear, nn.Linear):
            continue
        if name not in targets:
            kept.append(name)
            continue
        if bases is not None:
            bases[name] = linear.weight.detach().to("cpu", copy=True)
        if device is not None:
            linear = linear.to(device)
        if precision is Precision.FP8:
            new = Fp8Linear.from_linear(linear, compute_dtype)
        elif native_fp4:
            new = _torchao_native_nvfp4(linear)
        else:
            new = Nvfp4WeightOnlyLinear.from_linear(linear, compute_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        count += 1
    if device is not None:
        model.to(device)
    return QuantReport(precision, count, tuple(kept), before, module_bytes(model), native_fp4 and precision is Precision.FP4)
