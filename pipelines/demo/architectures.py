"""The two embedded demo models: the real Flux and SDXL architectures (diffusers/transformers classes), small.

Sized so that both fit the repository's 20 MB budget in fp16 safetensors, run on a CPU in seconds, and
still have enough capacity to learn the synthetic scenes of `scenes.py` at 64x64 pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                       UNet2DConditionModel)
from tokenizers import AddedToken
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..text_tokenizers import build_clip_tokenizer, build_t5_tokenizer
from .edits import INSTRUCTION_WORDS
from .scenes import COLOURS, KINDS, POSITION_PHRASES, SIZES

IMAGE_SIZE = 64  # the models are trained at 64x64 only
T5_TOKENS = 32  # every caption fits (the longest has 24 words), and every edit instruction (at most 9)
TEXT_WIDTH = 128


def caption_words() -> list[str]:
    words = {"a", "and", "on", "background", *KINDS, *COLOURS, *SIZES}
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


def clip_tokenizer():
    return build_clip_tokenizer(caption_words(), 77)


def t5_tokenizer():
    return build_t5_tokenizer(caption_words(), T5_TOKENS)


def new_instruction_words() -> list[str]:
    """The instruction words (`edits.INSTRUCTION_WORDS`) the caption vocabulary lacks."""
    return sorted(set(INSTRUCTION_WORDS) - set(caption_words()))


def with_instruction_words(tokenizer):
    """`tokenizer` (a caption tokenizer, CLIP or T5) plus one whole-word token per new instruction word.

    Added after the existing ids rather than rebuilt: rebuilding the byte-pair merges with more words
    renumbers the vocabulary and re-splits known words ("pink" became p+in+k), so a model trained on the
    captions would no longer read them as it learned to. `single_word` keeps "to" from matching in "top".
    """
    tokenizer.add_tokens([AddedToken(word, single_word=True) for word in new_instruction_words()])
    return tokenizer


def editor_tokenizers():
    """(CLIP, T5) tokenizers of demo-kontext: the caption tokenizers with the instruction words."""
    return with_instruction_words(clip_tokenizer()), with_instruction_words(t5_tokenizer())


def clip_config(vocab_size: int, layers: int = 2) -> CLIPTextConfig:
    # eos_token_id 1 is our tokenizer's <|endoftext|>: CLIP pools the hidden state at the first EOS.
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                          projection_dim=TEXT_WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                          hidden_act="gelu")


def demo_vae(latent_channels: int, scaling_factor: float = 1.0, shift_factor: float | None = None) -> AutoencoderKL:
    """4x downsampling (64 px -> 16x16 latents)."""
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=[32, 48, 48],
                         down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=16,
                         sample_size=IMAGE_SIZE, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=latent_channels == 4, use_post_quant_conv=latent_channels == 4,
                         force_upcast=False)


@dataclass
class FluxParts:
    tokenizer: object
    tokenizer_2: object
    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel
    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler


def new_flux() -> FluxParts:
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    return FluxParts(
        tokenizer=tok, tokenizer_2=tok2,
        text_encoder=CLIPTextModel(clip_config(len(tok))),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=TEXT_WIDTH, d_ff=2 * TEXT_WIDTH, d_kv=32,
                                               num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
                                               decoder_start_token_id=0, dropout_rate=0.0)),
        # 16 latent channels packed 2x2 -> 64 input features per token, as in FLUX.1.
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                           attention_head_dim=32, num_attention_heads=4, joint_attention_dim=TEXT_WIDTH,
                                           pooled_projection_dim=TEXT_WIDTH, guidance_embeds=False,
                                           axes_dims_rope=[8, 12, 12]),
        vae=demo_vae(16),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
    )


@dataclass
class SdxlParts:
    tokenizer: object
    tokenizer_2: object
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: EulerDiscreteScheduler


SDXL_TIME_EMBED = 32


def new_sdxl() -> SdxlParts:
    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    return SdxlParts(
        tokenizer=tok, tokenizer_2=tok2,
        text_encoder=CLIPTextModel(clip_config(len(tok))),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(len(tok2))),
        unet=UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 1), use_linear_projection=True, cross_attention_dim=2 * TEXT_WIDTH,
            addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
            projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + TEXT_WIDTH, norm_num_groups=32),
        vae=demo_vae(4),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                         prediction_type="epsilon"),
    )
