"""The exact computation of each engine, as nn.Modules with tensor-only signatures.

The PyTorch backend runs these modules; the TensorRT backend exports these same modules to ONNX.
Because both backends share one call signature per component, the Flux and SDXL loops never ask
which backend is running.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CLIP_TOKENS = 77
VAE_DECODER = "vae"  # the VAE decoder: the component keeps the name of the weights folder
VAE_ENCODER = "vae_encoder"  # image to image: the VAE's encoder, a component of its own built from the "vae" weights


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int | str, ...]  # an int is fixed; a string names a dimension resolved from the shape ranges
    kind: str  # "ids" (int64 token ids) | "compute" (the component's dtype) | "float32"


@dataclass(frozen=True)
class GraphIO:
    """What a graph module takes and returns, as the family loop calls it (the export's inputs and outputs)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]


def token_ids_io(length: int, *outputs: str) -> GraphIO:
    """A text encoder: one prompt's token ids per call."""
    return GraphIO((TensorSpec("input_ids", (1, length), "ids"),), outputs)


def vae_decoder_io(vae_config) -> GraphIO:
    return GraphIO((TensorSpec("latents", ("batch", vae_config.get("latent_channels", 4), "lat_h", "lat_w"), "compute"),),
                   ("image",))


def vae_encoder_io(vae_config) -> GraphIO:
    return GraphIO((TensorSpec("image", ("batch", vae_config.get("in_channels", 3), "img_h", "img_w"), "compute"),),
                   ("mean", "std"))


class ClipPooled(nn.Module):
    """Flux `text_encoder`: CLIP-L pooled output (B, 768)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, output_hidden_states=False).pooler_output


class T5Hidden(nn.Module):
    """Flux `text_encoder_2`: T5 encoder last hidden state (B, S, 4096)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, output_hidden_states=False)[0]


class ClipPenultimate(nn.Module):
    """SDXL `text_encoder`: CLIP-L penultimate hidden state (B, 77, 768)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]


class ClipPenultimateAndProjection(nn.Module):
    """SDXL `text_encoder_2`: OpenCLIP-bigG penultimate hidden state (B, 77, 1280) and projected pooled (B, 1280)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class FluxDenoiser(nn.Module):
    """Flux `transformer`: velocity prediction for packed latents."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


class KontextDenoiser(nn.Module):
    """FLUX.1 Kontext `transformer`: velocity for the packed noise latents, with the input image's packed latents
    appended after them as tokens of their own (`image_ids`, first coordinate 1); the prediction for the image's
    tokens is cut off here, so the engine's output is the noise tokens' alone (diffusers' FluxKontextPipeline)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states: torch.Tensor, image_latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                image_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        out = self.transformer(hidden_states=torch.cat([hidden_states, image_latents], dim=1),
                               encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                               timestep=timestep, img_ids=torch.cat([img_ids, image_ids], dim=0), txt_ids=txt_ids,
                               guidance=guidance, return_dict=False)[0]
        return out[:, :hidden_states.shape[1]]


class SdxlDenoiser(nn.Module):
    """SDXL `unet`: noise prediction with text_time conditioning."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]


class VaeDecoder(nn.Module):
    """`vae`: latents (already unscaled) to an image in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """`vae` encoder, for img2img: an image in [-1, 1] to the latent distribution's mean and std (unscaled).

    A component of its own (`VAE_ENCODER`), in a job's stages only when the job has an input image.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(image, return_dict=False)[0]
        return dist.mean, dist.std
