"""DevicePolicy: the one place that decides which dtype each component computes in on a device.

Built from the device the job runs on (`for_device`) or from the GPU an engine is built for
(`for_target`); the torch backend, TensorRT, Compare, bench and the manager all ask it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cpu_math import FAST_CPU, CpuMath
from .families import family_of
from .families.family import weights_of
from .gpu import DeviceInfo
from .precision import BF16_MIN_CC, Backend, Capability, Precision, PrecisionSupport, precision_support
from .registry import ModelSpec

LIGHT_PARTS = ("scheduler", "tokenizer", "tokenizer_2")  # no device memory, no dtype


@dataclass(frozen=True)
class DevicePolicy:
    """The device facts every backend, estimate and dtype choice takes."""

    capability: Capability | None = None  # the GPU's compute capability; None on a CPU (or a GPU not named)
    cpu: bool = False
    # What this CPU computes fast (read only when `cpu`): where 16-bit math is slow, 16-bit weights compute in
    # FP32 (AVX2-only CPUs run bf16/fp16 matmuls ~160x slower than fp32; see cpu_math.py).
    cpu_math: CpuMath = FAST_CPU
    # A VAE that overflows in fp16 runs in bf16 (fp32's range, half its bytes and time) rather than fp32 where the
    # GPU has bf16; the PyTorch backend's lever (TorchOptions.bf16_vae), off for TensorRT builds (for_target).
    bf16_vae: bool = False

    @classmethod
    def for_device(cls, capability: Capability | None, cpu_math: CpuMath = FAST_CPU) -> "DevicePolicy":
        """The device a job runs on: a GPU's compute capability, or None for a CPU."""
        return cls(tuple(capability) if capability else None, cpu=capability is None, cpu_math=cpu_math)

    @classmethod
    def for_info(cls, info: DeviceInfo) -> "DevicePolicy":
        return cls(tuple(info.capability) if info.capability else None, cpu=not info.is_cuda,
                   cpu_math=info.cpu_math or FAST_CPU)

    @classmethod
    def for_target(cls, target: Capability | None) -> "DevicePolicy":
        """The GPU an engine is built for (None: exporting on a CPU, for a GPU that runs bf16)."""
        return cls(tuple(target) if target else None, cpu=False)

    @property
    def cuda_bf16(self) -> bool:
        """bf16 runs here: compute capability 8.0+ (and on every CPU)."""
        return self.capability is None or self.capability >= BF16_MIN_CC

    @property
    def sixteen_bit(self) -> Precision:
        """The 16-bit precision weights are converted from before FP8/FP4 quantization."""
        return Precision.BF16 if self.cuda_bf16 else Precision.FP16

    def compute_dtype(self, spec: ModelSpec, precision: Precision | str) -> torch.dtype:
        """The dtype the denoiser computes in: `weight_dtype` where this device runs it fast, else FP32."""
        return self._runs_fast(self._sixteen_bit(spec, precision))

    def _sixteen_bit(self, spec: ModelSpec, precision: Precision | str) -> torch.dtype:
        """The denoiser's 16-bit type. FP8/FP4 compute in the family's usual 16-bit type on a GPU (Flux bf16,
        SDXL fp16) and in bf16 on a CPU, where fp16 convolutions run ~10x slower (measured on the demo SDXL:
        521 vs 69 ms a step)."""
        precision = Precision.parse(precision)
        if precision is Precision.FP16:
            return torch.float16
        if precision is Precision.BF16 or self.cpu:
            return torch.bfloat16
        preferred = family_of(spec).quantized_compute
        return preferred if preferred != torch.bfloat16 or self.cuda_bf16 else torch.float16

    def _runs_fast(self, dtype: torch.dtype) -> torch.dtype:
        if self.cpu and dtype in (torch.bfloat16, torch.float16) and not self.cpu_math.fast(dtype):
            return torch.float32
        return dtype

    def weight_dtype(self, spec: ModelSpec, name: str, precision: Precision | str) -> torch.dtype | None:
        """The type component `name`'s weights are rounded to (None for tokenizers and schedulers): the
        16-bit choice, kept where the computation runs in FP32, so a picture is the same on every CPU."""
        if name in LIGHT_PARTS:
            return None
        name = weights_of(name)  # the VAE encoder runs in the VAE's dtype
        dtype = self._sixteen_bit(spec, precision)
        if name in family_of(spec).fp16_overflows:
            return torch.bfloat16 if self.cuda_bf16 else torch.float32
        if name == "vae" and dtype == torch.float16 and spec.components["vae"].config.get("force_upcast", False):
            # the SDXL / Flux VAEs produce NaN (black images) in fp16
            return torch.bfloat16 if self.bf16_vae and self.capability is not None and self.cuda_bf16 else torch.float32
        return dtype

    def component_dtype(self, spec: ModelSpec, name: str, precision: Precision | str) -> torch.dtype | None:
        """The dtype component `name` runs in (None for tokenizers and schedulers)."""
        dtype = self.weight_dtype(spec, name, precision)
        return None if dtype is None else self._runs_fast(dtype)

    def support(self, precision: Precision | str, backend: Backend) -> PrecisionSupport:
        """Whether `precision` runs here and as what, with this CPU's speeds counted."""
        return precision_support(precision, self.capability, backend, self.cpu_math if self.cpu else None)

    def reference_precision(self, spec: ModelSpec, precision: Precision | str = Precision.FP8) -> Precision:
        """The 16-bit precision `precision` computes in here: the baseline FP8/FP4 are compared against."""
        return Precision.BF16 if self._sixteen_bit(spec, precision) == torch.bfloat16 else Precision.FP16
