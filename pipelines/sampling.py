"""Pieces both family loops use: tokenizing, seeded noise, and turning decoded tensors into checked images."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .request import StageTimings


class NumericsError(RuntimeError):
    """The model produced NaN or infinite values; the image would be black or noise, so none is returned."""


@dataclass(frozen=True)
class FamilyOutput:
    images: tuple[Image.Image, ...]
    timings: StageTimings
    warnings: tuple[str, ...] = ()


def tokenize(tokenizer, prompt: str, max_length: int) -> tuple[torch.Tensor, bool]:
    """Token ids padded to `max_length`, and whether the prompt had to be cut to fit."""
    ids = tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    full = tokenizer([prompt], padding="longest", return_tensors="pt").input_ids
    return ids, full.shape[-1] > max_length


def truncation_warning(encoder: str, max_length: int) -> str:
    return f"The prompt is longer than {encoder}'s {max_length} tokens; the end was cut off."


def seed_generators(seeds: tuple[int, ...]) -> list[torch.Generator]:
    """One CPU random stream per image, so a seed gives the same image on any device (and alone or in a batch).

    Every draw of an image comes from its stream, in diffusers' order: the input image's latent sample
    (image to image), the starting noise, then an ancestral scheduler's step noise.
    """
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def seeded_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """One latent of `shape` per image, each from its own stream."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]).to(device)


def check_finite(tensor: torch.Tensor, where: str, hint: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise NumericsError(f"The {where} produced NaN or infinite values, so no image was saved. {hint}")


def stage_timings(clock, start, text_done, step_marks: list, vae_start, end, encode: tuple | None = None,
                  model_calls: int | None = None) -> StageTimings:
    """Milliseconds per stage from the loop's marks (read once, after the work: no sync per stage); `encode` is
    the (start, end) marks of the input image's VAE encoding, when the job has one; `model_calls`, the steps
    that ran the denoiser."""
    return StageTimings(text_encoders_ms=clock.ms(start, text_done),
                        steps_ms=tuple(clock.ms(a, b) for a, b in zip(step_marks, step_marks[1:])),
                        vae_ms=clock.ms(vae_start, end), vae_encoder_ms=clock.ms(*encode) if encode else 0.0,
                        model_calls=model_calls)


def family_output(decoded: torch.Tensor, timings: StageTimings, canvas, warnings: list[str]) -> FamilyOutput:
    """The images (pasted back into the input where a job inpainted), its timings and warnings."""
    images = decoded_to_images(decoded)
    return FamilyOutput(images if canvas is None else tuple(map(canvas.paste_back, images)), timings, tuple(warnings))


def decoded_to_images(decoded: torch.Tensor) -> tuple[Image.Image, ...]:
    """VAE output in [-1, 1] (N, 3, H, W) to RGB images."""
    pixels = (decoded.float() / 2 + 0.5).clamp(0, 1)
    arrays = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return tuple(Image.fromarray(a) for a in arrays)
