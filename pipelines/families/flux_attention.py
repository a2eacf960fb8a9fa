"""FLUX.1's attention computed in FP8 (pipelines/fp8_attention.py says why and how): FLUX.1 and Kontext.

The processor is diffusers' FluxAttnProcessor with its one call of `dispatch_attention_fn` replaced. Written out
here because diffusers has no way to give one model another attention function: its attention backends are a
process-wide registry of fixed names. tests/test_fp8_attention.py runs this processor and diffusers' side by
side with an exact kernel, so a diffusers release that changes the processor fails there, not in images.
"""
from __future__ import annotations

from typing import Callable

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, _get_qkv_projections
from torch import nn

from ..fp8_attention import fp8_attention


class Fp8FluxAttnProcessor(FluxAttnProcessor):
    def __init__(self, attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = fp8_attention):
        super().__init__()
        self.attention = attention  # [batch, tokens, heads, dim] Q, K, V -> output of the same shape

    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:  # double-stream blocks: the text tokens go first
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attention_mask is None:
            hidden_states = self.attention(query, key, value)
        else:  # FLUX.1 passes none; a caller that masks gets diffusers' own attention
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                                  backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def use_fp8_attention(transformer: nn.Module, attention: Callable = fp8_attention) -> int:
    """Give every attention module of a FLUX.1 transformer the FP8 processor; returns how many it changed.
    Modules with another processor (an IP-Adapter's) are left as they are."""
    changed = 0
    for module in transformer.modules():
        if isinstance(module, FluxAttention) and type(module.processor) is FluxAttnProcessor:
            module.set_processor(Fp8FluxAttnProcessor(attention))
            changed += 1
    return changed
