"""SDXL's attention projections fused into one GEMM each: Q, K and V of self-attention, K and V of cross-attention.

Why: on an H100 (2026-12-07, scripts/gpu_sdxl_unet_levers.py, one compiled CFG step at 1024x1024 in fp16) the
UNet took 37.1 ms fused against 38.8 unfused, both channels-last, and 39.2 as the app ran it before
(BENCHMARKS.md): SDXL's projections are narrow (640 and 1280 wide), so three small GEMMs waste the GPU more than
one three times as wide.

diffusers' `fuse_qkv_projections` builds the fused layers as copies; here the separate layers then become views
into the fused weight. So the weights are not held twice, and a LoRA, which `torch_lora` writes into `to_q`,
`to_k`, `to_v` by name and in place, lands in the fused weight the model runs.
"""
from __future__ import annotations

from diffusers.models.attention_processor import Attention
from torch import nn


def fuse_qkv_projections(unet: nn.Module) -> int:
    """Fuse every attention module's projections (see above); returns how many modules were fused."""
    unet.fuse_qkv_projections()
    fused = 0
    for module in unet.modules():
        if not (isinstance(module, Attention) and module.fused_projections):
            continue
        whole, parts = ((module.to_kv, (module.to_k, module.to_v)) if module.is_cross_attention else
                        (module.to_qkv, (module.to_q, module.to_k, module.to_v)))
        start = 0
        for part in parts:
            end = start + part.out_features
            part.weight = nn.Parameter(whole.weight.detach()[start:end], requires_grad=False)
            if part.bias is not None:
                part.bias = nn.Parameter(whole.bias.detach()[start:end], requires_grad=False)
            start = end
        fused += 1
    return fused
