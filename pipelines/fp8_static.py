"""Calibrated (static) activation scales for the PyTorch path's FP8 layers: record, set, clear.

Why: a compiled Flux.1-dev FP8 step on the H200 spends about 17 of its 108 ms in Triton kernels that find each
activation row's amax before quantizing it (torch profiler, BENCHMARKS.md "Where a compiled Flux FP8 step goes").
With one calibrated scale per layer, quantizing is a pointwise divide that inductor can fuse into the kernel
producing the activation, and that pass goes. The ranges are what the TensorRT path calibrates too (the max of
|input| of every quantized Linear over real denoising steps, `backends/tensorrt/quantize.py`), taken here with
plain forward hooks because the layers are already our own `Fp8Linear`s (ModelOpt would swap them for its own).

Measured (H100, 2026-12-07, `scripts/gpu_fp8_static_scales.py`): 109.2 -> 104.1 ms a compiled FLUX.1-dev call
at the same error against bf16, less than predicted. Not used by the app: the ranges would have to come from a
calibration over real trajectories of the weights in use (and each LoRA set), and inputs beyond them clip, where
per-row scales never do; 5% of a step does not pay for that yet (BENCHMARKS.md). Per-row scales stay.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Mapping

from torch import nn

from .quant import Fp8Linear


def fp8_layers(model: nn.Module) -> dict[str, Fp8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}


@contextmanager
def recording_input_amax(model: nn.Module) -> Iterator[dict[str, float]]:
    """Within the block, every FP8 layer's largest |input| is kept in the yielded {layer name: amax}."""
    amax: dict[str, float] = {}

    def hook(name: str):
        def record(_module, args) -> None:
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().amax()))
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in fp8_layers(model).items()]
    try:
        yield amax
    finally:
        for handle in handles:
            handle.remove()


def set_input_scales(model: nn.Module, amax: Mapping[str, float]) -> int:
    """Give each FP8 layer named in `amax` its calibrated scale; returns how many got one. Layers the calibration
    never ran, or saw no finite positive range for, keep per-row scales."""
    count = 0
    for name, layer in fp8_layers(model).items():
        value = amax.get(name)
        if value is not None and math.isfinite(value) and value > 0:
            layer.set_input_amax(value)
            count += 1
    return count


def clear_input_scales(model: nn.Module) -> None:
    for layer in fp8_layers(model).values():
        layer.set_input_amax(None)
