"""Which components a model has, in which dtype each runs at a given precision, and what each costs in memory.

Only the denoiser (Flux transformer, SDXL UNet) changes with the FP8/FP4 choice; text encoders and
the VAE stay 16-bit (or fp32 where fp16 overflows), so they are shared between precisions and the
Compare tab does not load them three times.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .families import flux, sdxl
from .graphs import FLUX_ADAPTERS, SDXL_ADAPTERS
from .precision import Precision
from .quant import FP4_BLOCK
from .registry import Family, ModelSpec

FAMILY_MODULES: dict[Family, ModuleType] = {Family.FLUX: flux, Family.SDXL: sdxl}
ADAPTERS = {Family.FLUX: FLUX_ADAPTERS, Family.SDXL: SDXL_ADAPTERS}
LIGHT_PARTS = ("scheduler", "tokenizer", "tokenizer_2")  # no device memory


@dataclass(frozen=True)
class ComponentKey:
    """One loadable thing in one form: shared by every job that needs exactly this form."""

    model: str
    name: str
    variant: str  # dtype name for 16-bit parts; the precision for the denoiser
    backend: str

    def __str__(self) -> str:
        return f"{self.model}/{self.name}[{self.variant},{self.backend}]"


@dataclass
class LoadedComponent:
    key: ComponentKey
    obj: Any  # engine (callable with the graph's keyword arguments), tokenizer or scheduler
    nbytes: int
    dtype: torch.dtype | None
    runs_as: str | None = None  # for the denoiser: what precision really executes


def stages(spec: ModelSpec) -> tuple[tuple[str, ...], ...]:
    """The components each stage needs resident at once, in order."""
    return (("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"), ("scheduler", spec.denoiser), ("vae",))


def dtype_policy(capability: tuple[int, int] | None) -> dict[str, bool]:
    """The device facts `compute_dtype` and friends take: bf16 support (sm80+) and whether it is a CPU (None)."""
    return {"cuda_bf16": capability is None or capability >= (8, 0), "cpu": capability is None}


def compute_dtype(spec: ModelSpec, precision: Precision, cuda_bf16: bool = True, cpu: bool = False) -> torch.dtype:
    """The 16-bit dtype the denoiser computes in. FP8/FP4 compute in the family's usual 16-bit type on a GPU
    (Flux bf16, SDXL fp16) and in bf16 on a CPU, where fp16 convolutions run ~10x slower (measured on the
    demo SDXL: 521 vs 69 ms a step)."""
    precision = Precision.parse(precision)
    if precision is Precision.FP16:
        return torch.float16
    if precision is Precision.BF16 or cpu:
        return torch.bfloat16
    if spec.family is Family.FLUX:
        return torch.bfloat16 if cuda_bf16 else torch.float16
    return torch.float16


def component_dtype(spec: ModelSpec, name: str, precision: Precision, cuda_bf16: bool = True,
                    cpu: bool = False) -> torch.dtype | None:
    if name in LIGHT_PARTS:
        return None
    dtype = compute_dtype(spec, precision, cuda_bf16, cpu)
    if name == "text_encoder_2" and spec.family is Family.FLUX:
        # T5 overflows in fp16 (NaN embeddings: diffusers #8604, candle #2480); bf16, else fp32.
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name == "vae" and dtype == torch.float16 and spec.components["vae"].config.get("force_upcast", False):
        return torch.float32  # the SDXL / Flux VAEs produce NaN (black images) in fp16
    return dtype


def component_key(spec: ModelSpec, name: str, precision: Precision, backend: str, cuda_bf16: bool = True,
                  cpu: bool = False) -> ComponentKey:
    if name == spec.denoiser:
        variant = Precision.parse(precision).value
    else:
        dtype = component_dtype(spec, name, precision, cuda_bf16, cpu)
        variant = str(dtype).removeprefix("torch.") if dtype is not None else "-"
    return ComponentKey(spec.id, name, variant, backend)


@functools.lru_cache(maxsize=64)
def _architecture(library: str, class_name: str, config_json: str) -> tuple[int, tuple[tuple[str, int, int], ...]]:
    """(parameter + buffer count, Linear layers as (top-level module, in, out)), counted on the meta device."""
    import diffusers
    import transformers

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
    with torch.device("meta"):  # builds the architecture without memory or time
        module = cls.from_config(config) if library == "diffusers" else cls(cls.config_class(**config))
    count = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
    linears = tuple((name.split(".")[0], m.in_features, m.out_features) for name, m in module.named_modules()
                    if isinstance(m, nn.Linear))
    return count, linears


def estimate_bytes(spec: ModelSpec, name: str, precision: Precision, cuda_bf16: bool = True, cpu: bool = False) -> int:
    """Memory the component will hold once loaded, from its architecture (before loading anything)."""
    dtype = component_dtype(spec, name, precision, cuda_bf16, cpu)
    if dtype is None:
        return 0
    comp = spec.components[name]
    params, linears = _architecture(comp.library, comp.class_name, json.dumps(dict(comp.config), sort_keys=True))
    element = torch.empty((), dtype=dtype).element_size()
    precision = Precision.parse(precision)
    if name != spec.denoiser or precision.is_16bit:
        return params * element
    keep = set(FAMILY_MODULES[spec.family].KEEP_16BIT)
    total = params * element
    for top, n_in, n_out in linears:
        if top in keep or n_in % 16 or n_out % 16:
            continue
        if precision is Precision.FP8:
            quantized = n_in * n_out + 4 * n_out  # e4m3 values + fp32 per-channel scales
        else:
            quantized = n_in * n_out // 2 + n_in * n_out // FP4_BLOCK  # packed e2m1 + e4m3 block scales
        total += quantized - n_in * n_out * element
    return total


def largest_linear_bytes(spec: ModelSpec, name: str) -> int:
    """16-bit bytes of the component's largest Linear layer (what staging holds on the device at once)."""
    comp = spec.components[name]
    _, linears = _architecture(comp.library, comp.class_name, json.dumps(dict(comp.config), sort_keys=True))
    return max((n_in * n_out * 2 for _, n_in, n_out in linears), default=0)


def activation_bytes(spec: ModelSpec, width: int, height: int, num_images: int, vae_dtype_bytes: int = 2) -> int:
    """Working memory a job needs beyond the weights: dominated by the VAE decoder at full resolution.

    The decoder keeps a few 128-channel maps at full resolution alive at once (about 12 such maps per
    image, measured as an upper bound); the denoiser's activations are smaller at these sizes.
    """
    return num_images * width * height * 128 * vae_dtype_bytes * 12
