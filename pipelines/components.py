"""Which components a model has, what each costs in memory, and the key each loaded form is shared under.

Only the denoiser (Flux transformer, SDXL UNet) changes with the FP8/FP4 choice; text encoders and
the VAE stay 16-bit (or fp32 where fp16 overflows), so they are shared between precisions and the
Compare tab does not load them three times.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .device_policy import DevicePolicy
from .families import family_of
from .families.family import weights_of
from .precision import Precision
from .quant import FP4_BLOCK, quantizable
from .registry import ModelSpec


@dataclass(frozen=True)
class ComponentKey:
    """One loadable thing in one form: shared by every job that needs exactly this form."""

    model: str
    name: str
    variant: str  # dtype name for 16-bit parts; the precision for the denoiser
    backend: str
    # A form that depends on LoRAs (the backend says which: a TensorRT engine built with a LoRA set fused,
    # a quantized torch module that keeps its 16-bit base for LoRAs); "" for the plain form.
    lora: str = ""

    def __str__(self) -> str:
        return f"{self.model}/{self.name}[{self.variant},{self.backend}{',lora ' + self.lora if self.lora else ''}]"


@dataclass
class LoadedComponent:
    obj: Any  # engine (callable with the graph's keyword arguments), tokenizer or scheduler
    nbytes: int
    dtype: torch.dtype | None
    runs_as: str | None = None  # for the denoiser: what precision really executes
    lora: Any = None  # torch modules LoRAs can change: their backends.torch_lora.LoraState

    @property
    def host_bytes(self) -> int:
        """Host memory held beside the weights: the 16-bit bases kept to unfuse LoRAs."""
        return self.lora.host_bytes if self.lora is not None else 0


def component_key(spec: ModelSpec, name: str, precision: Precision, backend: str,
                  policy: DevicePolicy = DevicePolicy()) -> ComponentKey:
    """The key the manager loads component `name` under (backends never name what they load)."""
    if name == spec.denoiser:
        variant = Precision.parse(precision).value
    else:
        dtype = policy.component_dtype(spec, name, precision)
        variant = str(dtype).removeprefix("torch.") if dtype is not None else "-"
    return ComponentKey(spec.id, name, variant, backend)


def _meta_module(library: str, class_name: str, config_json: str) -> nn.Module:
    import diffusers
    import transformers

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
    with torch.device("meta"):  # builds the architecture without memory or time
        return cls.from_config(config) if library == "diffusers" else cls(cls.config_class(**config))


@functools.lru_cache(maxsize=64)
def _architecture(library: str, class_name: str, config_json: str) -> tuple[int, tuple[tuple[str, int, int], ...]]:
    """(parameter + buffer count, Linear layers as (top-level module, in, out)), counted on the meta device."""
    module = _meta_module(library, class_name, config_json)
    count = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
    linears = tuple((name.split(".")[0], m.in_features, m.out_features) for name, m in module.named_modules()
                    if isinstance(m, nn.Linear))
    return count, linears


def estimate_bytes(spec: ModelSpec, name: str, precision: Precision, policy: DevicePolicy = DevicePolicy()) -> int:
    """Memory the component will hold once loaded, from its architecture (before loading anything)."""
    dtype = policy.component_dtype(spec, name, precision)
    if dtype is None:
        return 0
    comp = spec.components[weights_of(name)]  # the VAE encoder: counted as the whole VAE (an upper bound)
    params, linears = _architecture(comp.library, comp.class_name, json.dumps(dict(comp.config), sort_keys=True))
    element = torch.empty((), dtype=dtype).element_size()
    precision = Precision.parse(precision)
    if name != spec.denoiser or precision.is_16bit:
        return params * element
    keep = family_of(spec).keep_16bit
    total = params * element
    for top, n_in, n_out in linears:
        if not quantizable(top, n_in, n_out, keep):
            continue
        if precision is Precision.FP8:
            quantized = n_in * n_out + 4 * n_out  # e4m3 values + fp32 per-channel scales
        else:
            quantized = n_in * n_out // 2 + n_in * n_out // FP4_BLOCK  # packed e2m1 + e4m3 block scales
        total += quantized - n_in * n_out * element
    return total


@functools.lru_cache(maxsize=16)
def _weight_shapes(library: str, class_name: str, config_json: str) -> dict[str, tuple[int, ...]]:
    module = _meta_module(library, class_name, config_json)
    return {name: tuple(m.weight.shape) for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def weight_shapes(spec: ModelSpec, name: str) -> dict[str, tuple[int, ...]]:
    """Component `name`'s Linear and Conv2d layers -> weight shape, from its architecture (before loading
    anything): what a LoRA file is checked against."""
    comp = spec.components[name]
    return _weight_shapes(comp.library, comp.class_name, json.dumps(dict(comp.config), sort_keys=True))


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
