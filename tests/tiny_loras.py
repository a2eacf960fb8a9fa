"""Tiny LoRA files in the layouts people download, written by the tests for the tiny models (tests/tiny_models.py)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# Layers of the tiny models, as (diffusers path, kohya name, (out, in)).
FLUX_LAYERS = [("transformer_blocks.0.attn.to_out.0", "lora_unet_double_blocks_0_img_attn_proj", (32, 32)),
               ("transformer_blocks.0.ff.net.2", "lora_unet_double_blocks_0_img_mlp_2", (32, 128)),
               ("single_transformer_blocks.0.proj_out", "lora_unet_single_blocks_0_linear2", (32, 160))]
SDXL_UNET = [("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
              "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", (64, 64)),
             ("up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
              "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", (64, 64))]
SDXL_TE = [("text_model.encoder.layers.0.self_attn.q_proj", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (32, 32))]


def _pair(out_in: tuple[int, int], rank: int, gen: torch.Generator, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = out_in
    return (torch.randn(rank, inp, generator=gen) * std).half(), (torch.randn(out, rank, generator=gen) * std).half()


def write_peft(path: Path, prefix: str, layers, rank: int = 4, seed: int = 0, std: float = 0.5) -> Path:
    """diffusers/PEFT layout: `<component>.<layer>.lora_A.weight` / `lora_B.weight` (alpha = rank)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, _, shape in layers:
        down, up = _pair(shape, rank, gen, std)
        tensors[f"{prefix}.{layer}.lora_A.weight"], tensors[f"{prefix}.{layer}.lora_B.weight"] = down, up
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_kohya(path: Path, layers, rank: int = 4, alpha: float = 2.0, seed: int = 0, std: float = 0.5) -> Path:
    """kohya / Automatic1111 layout: `lora_unet_..._x.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for _, kohya, shape in layers:
        down, up = _pair(shape, rank, gen, std)
        tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"] = down, up
        tensors[f"{kohya}.alpha"] = torch.tensor(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
