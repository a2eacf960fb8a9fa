"""Tiny Flux and SDXL pipelines with random weights, saved in the exact Hugging Face layout.

They load through the same code path as a downloaded checkpoint (model_index.json, one folder per
component, safetensors weights, tokenizer files) and run on a CPU in well under a second per image.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline,
                       FluxPipeline, FluxTransformer2DModel, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from pipelines.text_tokenizers import BASIC_WORDS, build_clip_tokenizer, build_t5_tokenizer

WORDS = BASIC_WORDS + ["astronaut", "horse", "riding", "moon"]
LIMITS = {"size": {"multiple_of": 16, "min_side": 32, "max_side": 128},
          "default_width": 32, "default_height": 32, "default_steps": 3}


def _clip_config(vocab: int, projection: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=projection,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")


def save_tiny_flux(folder: Path, guidance_embeds: bool = True, seed: int = 0, pipeline: type = FluxPipeline) -> Path:
    """A tiny Flux.1 pipeline folder; `pipeline=FluxKontextPipeline` saves the same components as a Kontext model
    (Kontext's transformer is a FluxTransformer2DModel like FLUX.1-dev's)."""
    torch.manual_seed(seed)
    clip_tok = build_clip_tokenizer(WORDS, 77)
    t5_tok = build_t5_tokenizer(WORDS, 32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 6, 6])
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=[16, 32],
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.5,
                        shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    text_encoder = CLIPTextModel(_clip_config(len(clip_tok)))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=64, d_kv=8, num_heads=4,
                                             num_layers=2, feed_forward_proj="gated-gelu", decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if guidance_embeds else 1.0,
                                                use_dynamic_shifting=guidance_embeds)
    pipe = pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder)
    (folder / "prism.json").write_text(json.dumps({**LIMITS, "max_prompt_tokens": 32}))
    return folder


def _tiny_sdxl_unet(cross_attention_dim: int, time_ids: int) -> UNet2DConditionModel:
    """A tiny SDXL UNet: text_time conditioning on `time_ids` size/score numbers (6 base, 5 refiner)."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_time_embed_dim=8,
        addition_embed_type="text_time", transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=time_ids * 8 + 32, cross_attention_dim=cross_attention_dim,
        norm_num_groups=16)


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading")


def _tiny_sdxl_pipeline(seed: int) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tok = build_clip_tokenizer(WORDS, 77)
    unet = _tiny_sdxl_unet(cross_attention_dim=64, time_ids=6)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=[16, 32],
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.13025,
                        force_upcast=False)  # tiny SDXL keeps a 16-bit VAE; tiny Flux covers the fp32 upcast path
    return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(_clip_config(len(tok))),
                                     text_encoder_2=CLIPTextModelWithProjection(_clip_config(len(tok))),
                                     tokenizer=tok, tokenizer_2=build_clip_tokenizer(WORDS, 77), unet=unet,
                                     scheduler=_sdxl_scheduler())


def _save_sdxl(pipe, folder: Path, **spec_overrides) -> Path:
    pipe.save_pretrained(folder)
    (folder / "prism.json").write_text(json.dumps({**LIMITS, "size": {**LIMITS["size"], "multiple_of": 8},
                                                   "default_guidance": 5.0, **spec_overrides}))
    return folder


def save_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    return _save_sdxl(_tiny_sdxl_pipeline(seed), folder)


def save_tiny_sdxl_with_refiner(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny SDXL base (the same weights as `save_tiny_sdxl`'s) and its refiner, as the two Hub repos are laid
    out: the refiner's folder has its own UNet (OpenCLIP-bigG width 32 as cross-attention, 5 time ids with the
    aesthetic score), the base's `text_encoder_2` and VAE, no `text_encoder`, and `requires_aesthetics_score`.
    The base's prism.json names the refiner's folder, beside it."""
    base = _tiny_sdxl_pipeline(seed)
    torch.manual_seed(seed + 1)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=_tiny_sdxl_unet(cross_attention_dim=32, time_ids=5),
        scheduler=_sdxl_scheduler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner_folder = _save_sdxl(refiner, root / "tiny-sdxl-refiner")
    return _save_sdxl(base, root / "tiny-sdxl-base", refiner=refiner_folder.name), refiner_folder
