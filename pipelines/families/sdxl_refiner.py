"""The SDXL base -> refiner hand-off, as diffusers' two pipelines do it (its "ensemble of expert denoisers"):
StableDiffusionXLPipeline(denoising_end=switch, output_type="latent") hands its latents, still noisy, to
StableDiffusionXLImg2ImgPipeline(denoising_start=switch) on the refiner, which runs the rest of the schedule.

The refiner reads only OpenCLIP-bigG's output (`text_encoder_2`, shared with the base and encoded once), is
conditioned on an aesthetic score instead of the target size, and encodes an empty negative prompt as text
rather than zeros (its `force_zeros_for_empty_prompt` is False).
"""
from __future__ import annotations

import torch

from ..request import RequestError

# StableDiffusionXLImg2ImgPipeline's defaults, what the refiner was trained to read (SDXL report, section 2.5).
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def _cutoff(switch: float, num_train_timesteps: int) -> int:
    """The training timestep where the base stops and the refiner starts (diffusers' rounding)."""
    return int(round(num_train_timesteps - switch * num_train_timesteps))


def base_part(timesteps: torch.Tensor, switch: float, num_train_timesteps: int) -> torch.Tensor:
    """The base's timesteps: those at or above the cutoff (StableDiffusionXLPipeline's `denoising_end`)."""
    return timesteps[:int((timesteps >= _cutoff(switch, num_train_timesteps)).sum())]


def refiner_start(scheduler, switch: float) -> int:
    """The index in the refiner scheduler's timesteps it starts at (StableDiffusionXLImg2ImgPipeline.get_timesteps
    with `denoising_start`: a second-order scheduler starts on a whole step)."""
    count = int((scheduler.timesteps < _cutoff(switch, scheduler.config.num_train_timesteps)).sum())
    if scheduler.order == 2 and count % 2 == 0:
        count += 1
    return len(scheduler.timesteps) - count


def check_split(base_steps: int, refiner_steps: int, switch: float, steps: int) -> None:
    """Both models must run at least one step, or the hand-off is not what the user asked for."""
    if base_steps == 0:
        raise RequestError(f"refiner switch {switch:g} leaves the base model no step of its {steps}; raise the "
                           "switch (or the strength, with an input image) or the steps.")
    if refiner_steps == 0:
        raise RequestError(f"refiner switch {switch:g} with {steps} steps leaves the refiner no step; lower the "
                           "switch or raise the steps.")


def conditioning(hidden: torch.Tensor, pooled: torch.Tensor, negative: tuple[torch.Tensor, torch.Tensor] | None,
                 n: int, height: int, width: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The refiner UNet's keyword arguments for `n` images: text_encoder_2's hidden states and pooled output,
    and time ids (original size, crop, aesthetic score); with guidance the unconditional half first."""
    def time_ids(score: float) -> torch.Tensor:
        return torch.tensor([[height, width, 0, 0, score]], dtype=dtype, device=device).repeat(n, 1)

    cond = dict(encoder_hidden_states=hidden.to(dtype).repeat(n, 1, 1), text_embeds=pooled.to(dtype).repeat(n, 1),
                time_ids=time_ids(AESTHETIC_SCORE))
    if negative is None:
        return cond
    neg_hidden, neg_pooled = negative
    return dict(encoder_hidden_states=torch.cat([neg_hidden.to(dtype).repeat(n, 1, 1), cond["encoder_hidden_states"]]),
                text_embeds=torch.cat([neg_pooled.to(dtype).repeat(n, 1), cond["text_embeds"]]),
                time_ids=torch.cat([time_ids(NEGATIVE_AESTHETIC_SCORE), cond["time_ids"]]))
