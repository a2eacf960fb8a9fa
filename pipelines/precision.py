"""Precisions, and what a given GPU and backend can honestly do with each.

One enum for the user's choice; one function that says whether that choice runs natively,
runs emulated (and what that means for speed and memory), or cannot run, with the reason as
text that the UI and CLI show unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cpu_math import CpuMath


class Precision(str, Enum):
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    FP4 = "fp4"

    @property
    def is_16bit(self) -> bool:
        return self in (Precision.FP16, Precision.BF16)

    @property
    def label(self) -> str:
        return self.value.upper()

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise ValueError(f"Unknown precision {value!r}; choose one of: {choices}.") from None


class Backend(str, Enum):
    TORCH = "torch"
    TENSORRT = "tensorrt"


class SupportLevel(str, Enum):
    NATIVE = "native"
    EMULATED = "emulated"
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class PrecisionSupport:
    precision: Precision
    level: SupportLevel
    runs_as: str  # what actually executes, shown beside every result ("FP4 weights, 16-bit compute")
    reason: str  # one sentence a user can act on

    @property
    def runnable(self) -> bool:
        return self.level is not SupportLevel.UNSUPPORTED


Capability = tuple[int, int]  # CUDA compute capability; None means "no GPU, running on the CPU"

FP8_MIN_CC: Capability = (8, 9)  # Ada / Hopper and newer have FP8 tensor cores
FP4_MIN_CC: Capability = (10, 0)  # Blackwell (B200 10.0, RTX 50 12.0, GB10 12.1) has NVFP4 tensor cores
BF16_MIN_CC: Capability = (8, 0)

FP4_WEIGHTS_ONLY = "FP4 weights, 16-bit compute"


def _cc(cc: Capability) -> str:
    return f"{cc[0]}.{cc[1]}"


def _on_cpu(p: Precision, backend: Backend, cpu: "CpuMath | None") -> PrecisionSupport:
    """On a CPU: 16-bit types compute natively where this CPU runs them fast, else in FP32 (`cpu` None: the
    CPU is not measured, as on a build machine, and 16-bit math is taken to be fast)."""
    if backend is Backend.TENSORRT:
        return PrecisionSupport(p, SupportLevel.UNSUPPORTED, "-", "TensorRT engines need an NVIDIA GPU; use the torch backend on a CPU.")
    sixteen = p.label if p.is_16bit else "BF16"  # FP8/FP4 emulation computes in bf16 on a CPU
    fast = cpu is None or (cpu.fast_fp16 if sixteen == "FP16" else cpu.fast_bf16)
    if p.is_16bit:
        if fast:
            return PrecisionSupport(p, SupportLevel.NATIVE, p.label, f"{p.label} runs natively on this CPU.")
        return PrecisionSupport(p, SupportLevel.EMULATED, f"{p.label} weights, FP32 compute",
                                f"This CPU has no fast {p.label} math, so {p.label} weights compute in FP32 (the same "
                                f"picture, far faster here than {p.label} arithmetic).")
    compute = "" if fast else ", FP32 compute"
    if p is Precision.FP8:
        return PrecisionSupport(p, SupportLevel.EMULATED, f"FP8 (CPU emulation{compute})",
                                "No FP8 hardware on a CPU: the same FP8 arithmetic is emulated, so quality matches a GPU but it is not faster.")
    return PrecisionSupport(p, SupportLevel.EMULATED, FP4_WEIGHTS_ONLY if fast else "FP4 weights, FP32 compute",
                            "No FP4 hardware on a CPU: FP4 weights are expanded at each matmul (less memory, not faster).")


def precision_support(precision: Precision, capability: Capability | None, backend: Backend,
                      cpu: "CpuMath | None" = None) -> PrecisionSupport:
    """Can `precision` run on a device of `capability` (None = CPU, whose measured speeds `cpu` gives) with
    `backend`, and as what?"""
    p = Precision.parse(precision)
    native = lambda why: PrecisionSupport(p, SupportLevel.NATIVE, p.label, why)  # noqa: E731

    if capability is None:
        return _on_cpu(p, backend, cpu)

    if p is Precision.FP16:
        return native("FP16 runs on every CUDA GPU.")
    if p is Precision.BF16:
        if capability >= BF16_MIN_CC:
            return native("BF16 runs natively from compute capability 8.0 (Ampere).")
        return PrecisionSupport(p, SupportLevel.UNSUPPORTED, "-",
                                f"BF16 needs compute capability 8.0 or newer; this GPU is {_cc(capability)}. Choose fp16.")
    if p is Precision.FP8:
        if capability >= FP8_MIN_CC:
            return native(f"FP8 tensor cores present (compute capability {_cc(capability)}).")
        return PrecisionSupport(p, SupportLevel.UNSUPPORTED, "-",
                                f"FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); this GPU is {_cc(capability)}. Choose bf16 or fp16.")
    # FP4
    if capability >= FP4_MIN_CC:
        return native(f"NVFP4 tensor cores present (compute capability {_cc(capability)}).")
    if backend is Backend.TENSORRT:
        return PrecisionSupport(p, SupportLevel.UNSUPPORTED, "-",
                                f"TensorRT FP4 engines need FP4 tensor cores (compute capability 10.0+, Blackwell); this GPU is {_cc(capability)}. "
                                "Use the torch backend for FP4 weights with 16-bit compute, or choose fp8.")
    return PrecisionSupport(p, SupportLevel.EMULATED, FP4_WEIGHTS_ONLY,
                            f"This GPU (compute capability {_cc(capability)}) has no FP4 tensor cores: FP4 weights are expanded to 16 bits "
                            "at each matmul. It saves memory; it is not faster.")
