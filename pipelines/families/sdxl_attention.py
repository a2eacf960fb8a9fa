"""SDXL's attention projections fused into one GEMM each: Q, K and V of self-attention, K and V of cross-attention.

Why: on an H100 (2026-12-07, scripts/gpu_sdxl_unet_levers.py, one compiled CFG step at 1024x1024 in fp16) the
UNet took 37.1 ms fused against 38.8 unfused, both channels-last, and 39.2 as the app ran it before
(BENCHMARKS.md): SDXL's projections are narrow (640 and 1280 wide), so three small GEMMs waste the GPU more than
one three times as wide.

diffusers' `fuse_qkv_projections` builds the fused layers as copies; here the separate layers then become views
into the fused weight. So the weights are not held twice, and a LoRA, which `torch_lora` writes into `to_q`,
`to_k`, `to_v` by name and in place, lands in the fused weight the model runs.

FP8 projections (our Fp8Linear, which diffusers cannot fuse) fuse exactly: each output channel keeps its own
weight scale and the three share one input, so its per-row quantization is the same. Built for measurement on
2026-12-08 and not yet used by the app: SDXL at FP8 issued 2515 kernels a step to fp16's 1520, and its GPU waited
on the host (BENCHMARKS.md); fusing takes ~210 GEMM launches off that. LoRAs reach it as at 16 bits: torch_lora
re-quantizes an FP8 layer into its existing buffers, here views of the fused ones.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from torch import nn

from ..quant import Fp8Linear


def projections(module: Attention) -> tuple[nn.Module, ...]:
    """The layers one GEMM can replace: K and V of cross-attention (their input is the text), else Q, K and V."""
    return (module.to_k, module.to_v) if module.is_cross_attention else (module.to_q, module.to_k, module.to_v)


def fusable_kind(module: Attention) -> type | None:
    """nn.Linear or Fp8Linear when all of `module`'s projections are of that kind (FP8 ones with per-row input
    scales), else None."""
    kinds = {type(part) for part in projections(module)}
    if kinds == {nn.Linear}:
        return nn.Linear
    if kinds == {Fp8Linear} and all(part.input_scale is None for part in projections(module)):
        return Fp8Linear
    return None


def fuse_qkv_projections(unet: nn.Module) -> int:
    """Fuse every attention module's projections (see above); returns how many modules were fused: all of them, or
    none when any cannot be (FP4 weights, calibrated FP8 scales, or a mix of kinds)."""
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    kinds = {fusable_kind(m) for m in attention}
    if kinds == {Fp8Linear}:
        unet.original_attn_processors = unet.attn_processors
        for module in attention:
            _fuse_fp8(module)
        unet.set_attn_processor(FusedAttnProcessor2_0())
        return len(attention)
    if kinds != {nn.Linear}:
        return 0
    unet.fuse_qkv_projections()
    for module in attention:
        whole = module.to_kv if module.is_cross_attention else module.to_qkv
        start = 0
        for part in projections(module):
            end = start + part.out_features
            part.weight = nn.Parameter(whole.weight.detach()[start:end], requires_grad=False)
            if part.bias is not None:
                part.bias = nn.Parameter(whole.bias.detach()[start:end], requires_grad=False)
            start = end
    return len(attention)


def _fuse_fp8(module: Attention) -> None:
    parts = projections(module)
    bias = None if parts[0].bias is None else torch.cat([part.bias for part in parts])
    whole = Fp8Linear(torch.cat([part.weight_fp8 for part in parts]), torch.cat([part.weight_scale for part in parts], dim=1),
                      bias, parts[0].compute_dtype, parts[0].gemm_out_dtype)
    start = 0
    for part in parts:  # views into the fused layer, as at 16 bits
        end = start + part.out_features
        part.weight_fp8, part.weight_scale = whole.weight_fp8[start:end], whole.weight_scale[:, start:end]
        if part.bias is not None:
            part.bias = nn.Parameter(whole.bias.detach()[start:end], requires_grad=False)
        start = end
    if module.is_cross_attention:
        module.to_kv = whole
    else:
        module.to_qkv = whole
    module.fused_projections = True
