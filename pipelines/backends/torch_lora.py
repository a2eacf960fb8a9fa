"""Fusing LoRAs into a loaded PyTorch module, and taking them out again without reading the checkpoint.

Fuse, then quantize: a layer's new weight is round16(base + sum(scale * alpha/rank * up @ down)), computed
in fp32 and rounded to the layer's 16-bit type; an FP8/FP4 layer is then re-quantized from that weight
by the same constructor that quantized it at load time, so a LoRA at FP8 is exactly quantize(fuse)
(what ModelOpt's calibration assumes for TensorRT too). The step costs the same as without a LoRA.

Unfusing restores the 16-bit base kept in `LoraState.base`, bit for bit. What that costs in memory:
- 16-bit modules: the base of each layer a LoRA has touched (copied out the first time it is touched);
- FP8/FP4 denoisers loaded for LoRAs: the 16-bit base of every quantized layer, kept when it is quantized
  (the 16-bit weights exist nowhere else; the size of the 16-bit model, e.g. about 23 GB for Flux.1-dev).
The copies live in host RAM on a discrete GPU (the manager counts them against its host budget) and
in the device's own memory on a CPU or unified-memory machine (counted against the device budget).

Apply is all or nothing: every layer is checked before any weight changes, and a failure half way (out
of memory) puts every touched layer back to its base before re-raising, so no half-fused model serves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..lora import LoraError, LowRank, model_layer
from ..quant import Fp8Linear, Nvfp4WeightOnlyLinear

REQUANTIZABLE = (Fp8Linear, Nvfp4WeightOnlyLinear)  # rebuilt from a 16-bit weight by their `from_linear`


@dataclass
class LoraState:
    """What one loaded module needs to switch LoRAs: its 16-bit bases and the set fused now."""

    module: nn.Module  # the diffusers / transformers module (inside the engine adapter)
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # layer path -> 16-bit base weight
    applied: tuple = ()  # LoraSet.key(component) of the weights in the module now

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.base.values())

    def apply(self, layers: dict[str, list[tuple[LowRank, float]]], key: tuple, lora_name: str = "") -> None:
        """Fuse exactly `layers` (every other layer touched before goes back to its base)."""
        if key == self.applied:
            return
        modules = dict(self.module.named_modules())
        targets = {}
        for layer, updates in layers.items():
            path = model_layer(layer, modules)
            target = modules.get(path) if path else None
            shape = _weight_shape(target)
            want = updates[0][0].weight_shape()
            if shape is None or shape != want:
                raise LoraError(f"LoRA {lora_name or 'set'}: layer {layer} is {shape} in the loaded model but {want} in "
                                "the LoRA; choose a LoRA made for this model.")
            if isinstance(target, REQUANTIZABLE) and path not in self.base:
                raise LoraError(f"LoRA {lora_name or 'set'}: layer {layer} was quantized without its 16-bit weights "
                                "kept; this is a bug, please report it.")
            if not isinstance(target, (nn.Linear, nn.Conv2d, *REQUANTIZABLE)):
                raise LoraError(f"LoRA {lora_name or 'set'}: layer {layer} is a {type(target).__name__}, which LoRAs "
                                "cannot change at this precision; use bf16 or fp8.")
            targets[path] = (target, updates)
        restore = [p for p in self.base if p not in targets]
        try:
            for path in restore:
                _write(modules[path], self.base[path])
            for path, (target, updates) in targets.items():
                base = self._base_of(path, target)
                fused = base.to(_device(target), torch.float32, copy=True)  # never the base itself (an fp32 one on a CPU)
                for lr, scale in updates:
                    fused += lr.delta(scale, fused.device)
                _write(target, fused.to(base.dtype))
        except BaseException:
            for path in self.base:  # never leave a half-fused model: back to the base everywhere
                _write(modules[path], self.base[path])
            self.applied = ()
            raise
        self.applied = key

    def _base_of(self, path: str, target: nn.Module) -> torch.Tensor:
        if path not in self.base:  # a 16-bit layer touched for the first time: keep its weight to unfuse
            self.base[path] = target.weight.detach().to("cpu", copy=True)
        return self.base[path]


def fuse_into(module: nn.Module, loras, component: str) -> None:
    """Fuse `loras` (a pipelines.lora.LoraSet) into a freshly loaded 16-bit module for good: TensorRT exports
    and calibrates the fused weights, and the module is thrown away afterwards (nothing to unfuse)."""
    if loras.touches(component):
        LoraState(module).apply(loras.layers(component), loras.key(component))


def _device(module: nn.Module) -> torch.device:
    return next(t.device for t in [*module.parameters(), *module.buffers()])


def _weight_shape(module: nn.Module | None) -> tuple[int, ...] | None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return tuple(module.weight.shape)
    if isinstance(module, REQUANTIZABLE):
        return (module.out_features, module.in_features)
    return None


def _write(module: nn.Module, weight16: torch.Tensor) -> None:
    """Put a 16-bit weight into a layer in place (tensor addresses stay, so compiled graphs stay valid)."""
    with torch.no_grad():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.copy_(weight16)
            return
        # The same constructor as at load time, so the result equals quantizing the fused 16-bit model.
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(weight16.to(_device(module)), requires_grad=False)
        fresh = type(module).from_linear(linear, module.compute_dtype)
        for name, buffer in fresh.named_buffers():
            getattr(module, name).copy_(buffer)
