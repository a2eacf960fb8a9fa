"""What every part of Prism may ask about a model family, as one frozen value per family.

The manager, the backends, the memory estimates and the TensorRT export read these fields instead of
asking which family a model is, so a new family is one module that builds a `ModelFamily`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import nn

from ..graphs import VAE_ENCODER, GraphIO, VaeEncoder, token_ids_io, vae_decoder_io, vae_encoder_io
from ..registry import Family
from ..schedulers import Sampler
from ..step_cache import NO_CACHE, StepCache

if TYPE_CHECKING:
    from ..registry import ModelSpec
    from ..request import GenerationRequest
    from ..run_context import Parts, RunContext
    from ..sampling import FamilyOutput

def weights_of(name: str) -> str:
    """The model component whose weights component `name` is built from."""
    return "vae" if name == VAE_ENCODER else name


# A job with a refiner reads the refiner's own parts under these names (its denoiser and scheduler); the text
# encoder and VAE it shares with the base are the base's, loaded once.
REFINER_PREFIX = "refiner_"


def part_owner(spec: "ModelSpec", name: str, refiner: "ModelSpec | None") -> tuple["ModelSpec", str]:
    """The model and component a job's part `name` is: `refiner_unet` is the refiner's `unet`."""
    if name.startswith(REFINER_PREFIX):
        assert refiner is not None, f"{name} needs a refiner"
        return refiner, name[len(REFINER_PREFIX):]
    return spec, name


class ImageUse(str, Enum):
    """What a family's loop does with an input image."""

    START = "start"  # optional: image to image and inpainting start from it noised to `strength`
    CONTEXT = "context"  # required: the image being edited; its tokens condition every step (no strength, no mask)


@dataclass(frozen=True)
class ModelFamily:
    kind: Family
    denoiser: str  # the component FP8/FP4 quantize and torch.compile compiles
    text_encoders: tuple[str, ...]  # dropped once the prompt is encoded
    # Top-level denoiser modules whose Linear layers stay 16-bit at FP8/FP4 (the quality anchors).
    keep_16bit: tuple[str, ...]
    compile_whole_denoiser: bool  # torch.compile scope on a GPU: the whole denoiser, else its repeated blocks
    # Component -> the nn.Module (pipelines.graphs) both backends run: the torch backend wraps the
    # diffusers/transformers module in it, TensorRT exports it.
    adapters: Mapping[str, type[nn.Module]]
    # The 16-bit type FP8/FP4 compute in on a GPU that runs bf16 (fp16 where bf16 is missing).
    quantized_compute: torch.dtype
    # Components that overflow in fp16: bf16, else fp32.
    fp16_overflows: tuple[str, ...]
    # Text encoder -> (token ids per prompt, None for the model's prompt limit; its outputs), for export.
    text_io: Mapping[str, tuple[int | None, tuple[str, ...]]]
    denoiser_io: Callable[["ModelSpec"], GraphIO]  # the denoiser's inputs and outputs, as `generate` calls it
    generate: Callable[["ModelSpec", "Parts", "GenerationRequest", "RunContext"], "FamilyOutput"]
    # Image to image: the step of the schedule a strength starts at (each family rounds as its diffusers pipeline).
    first_step: Callable[[int, float], int]
    guidance_batch: bool = False  # classifier-free guidance runs the denoiser on 2x the images
    negative_prompt: bool = False  # the loop takes a negative prompt (models may still turn it off)
    samplers: tuple[Sampler, ...] = ()  # what a user may pick instead of the model's own scheduler
    example_prompts: tuple[str, ...] = ()  # shown as clickable examples for the family's real models
    # diffusers pipeline class whose `lora_state_dict` reads (and converts) this family's LoRA files, and the
    # components a LoRA may change, by the key prefix diffusers gives them.
    lora_reader: str = ""
    lora_components: tuple[str, ...] = ()
    image_use: ImageUse = ImageUse.START
    fast_cache: StepCache = NO_CACHE  # the schedule "Fast (cached)" runs (pipelines.step_cache)
    # Switches the loaded denoiser's attention to FP8 (pipelines/fp8_attention.py), returning how many attention
    # modules it changed; None: the family has no FP8 attention.
    fp8_attention: Callable[[nn.Module], int] | None = None
    # Fuses the 16-bit denoiser's attention projections (one GEMM for Q, K, V), returning how many modules it
    # fused; None: the family does not.
    fuse_qkv: Callable[[nn.Module], int] | None = None
    # CONTEXT families: the (width, height) an input image of a given size is resized to, which is also the
    # output's size when the request names none.
    context_size: Callable[["ModelSpec", tuple[int, int]], tuple[int, int]] | None = None

    def adapter(self, name: str) -> type[nn.Module]:
        return VaeEncoder if name == VAE_ENCODER else self.adapters[name]

    def graph_io(self, spec: "ModelSpec", name: str) -> GraphIO:
        """Component `name`'s engine inputs and outputs (what TensorRT exports and profiles)."""
        if name == VAE_ENCODER:
            return vae_encoder_io(spec.components["vae"].config)
        if name in self.text_io:
            length, outputs = self.text_io[name]
            return token_ids_io(length or spec.max_prompt_tokens, *outputs)
        if name == "vae":
            return vae_decoder_io(spec.components["vae"].config)
        return self.denoiser_io(spec)

    def stages(self, with_image: bool = False, with_refiner: bool = False) -> tuple[tuple[str, ...], ...]:
        """The components each stage needs resident at once, in order; the VAE encoder only for an input image,
        the refiner's denoiser (after the base's) only for a job with a refiner."""
        encode = ((VAE_ENCODER,),) if with_image else ()
        refine = ((REFINER_PREFIX + "scheduler", REFINER_PREFIX + self.denoiser),) if with_refiner else ()
        return (("tokenizer", "tokenizer_2", *self.text_encoders), *encode, ("scheduler", self.denoiser), *refine,
                ("vae",))
