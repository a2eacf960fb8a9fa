"""FLUX.1 Kontext: edit an input image by an instruction. Flux.1's components and steps (pipelines.families.flux),
with the input image's latents as context: VAE-encoded (the distribution's mode), scaled, packed, and appended
after the noise tokens at every step with position ids of their own (first coordinate 1); the prediction is
the noise tokens' alone. Step for step diffusers' FluxKontextPipeline (tests compare them image for image).

Sizes: the input image is resized (stretched, Lanczos, as diffusers' VaeImageProcessor) to the model's preferred
size nearest its aspect ratio: one of Kontext's 17 trained resolutions for the real model (diffusers'
`_auto_resize`), the demo model's own 64x64 grid for the embedded one; the output has that size unless the
request names another.
"""
from __future__ import annotations

import torch
from PIL import Image

from .. import graphs
from ..graphs import VAE_ENCODER, GraphIO, TensorSpec
from ..image_input import to_tensor
from ..registry import Family, ModelSpec
from ..request import GenerationRequest
from ..run_context import Parts, RunContext, Stopwatch
from ..sampling import FamilyOutput, family_output, seed_generators, seeded_noise, stage_timings
from ..step_cache import StepCache
from . import flux
from .family import ImageUse, ModelFamily


def context_size(spec: ModelSpec, size: tuple[int, int]) -> tuple[int, int]:
    """The preferred (width, height) nearest the aspect ratio of an image of `size`, measured as diffusers does:
    on the size rounded down to whole 2x2 latent patches, ties to the smaller width."""
    multiple = 2 * spec.vae_scale_factor
    width, height = (max(v // multiple * multiple, multiple) for v in size)
    aspect = width / height
    return min(spec.preferred_sizes, key=lambda wh: (abs(aspect - wh[0] / wh[1]), wh[0], wh[1]))


def context_latents(spec: ModelSpec, parts: Parts, image: Image.Image, n: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed image latents repeated for the batch, their position ids): the image at its context size, encoded
    by the VAE's mode (diffusers' sample_mode="argmax": no randomness, the same context for every seed)."""
    width, height = context_size(spec, image.size)
    resized = image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)
    pixels = to_tensor(resized).to(device=device, dtype=parts.dtype(VAE_ENCODER))
    with torch.inference_mode():
        mean, _ = parts.get(VAE_ENCODER)(image=pixels)
    parts.done_with(VAE_ENCODER)
    latents = flux.scaled_latents(spec, mean).to(dtype)
    h, w = latents.shape[-2:]
    ids = flux.image_ids(h, w, device, dtype)
    ids[:, 0] = 1  # the context's tokens: same grid as the noise's, told apart by the first coordinate
    return flux.pack(latents).repeat(n, 1, 1), ids


def generate(spec: ModelSpec, parts: Parts, req: GenerationRequest, ctx: RunContext) -> FamilyOutput:
    device, n = ctx.device, req.num_images
    clock = Stopwatch(device)

    # 1. Encode the instruction once; every image of the batch shares it.
    ctx.report("text", 0, 1, "encoding the instruction")
    prompt = flux.encode_prompt(spec, parts, req.prompt, device, clock)

    # 2. Schedule: always the whole of it (an edit starts from noise; the input image steers every step).
    dtype = parts.dtype("transformer")
    h, w = flux.latent_grid(spec, req.width, req.height)
    scheduler = flux.flow_schedule(spec, parts, req, h, w, device)
    scheduler.set_begin_index(0)

    # 3. The input image as context tokens, and the starting noise.
    ctx.report("encode", 0, 1, "encoding the input image")
    t_encode = clock.mark()
    image_latents, context_ids = context_latents(spec, parts, req.image.image, n, device, dtype)
    t_encoded = clock.mark()
    channels = spec.components["transformer"].config["in_channels"] // 4
    latents = flux.pack(seeded_noise(seed_generators(tuple(req.seed + i for i in range(n))), (channels, h, w),
                                     device, dtype))
    cond = {**flux.text_conditioning(spec, prompt, req, h, w, device, dtype), "image_latents": image_latents,
            "image_ids": context_ids}

    # 4. Denoise; 5. decode (Flux's own).
    cache = StepCache.named(req.cache, flux.FAST_CACHE)
    latents, step_marks = flux.denoise(parts, scheduler, scheduler.timesteps, latents, cond, ctx, clock, cache=cache)
    decoded, (t_vae, t_end) = flux.decode(spec, parts, latents, h, w, ctx, clock)
    timings = stage_timings(clock, *prompt.marks, step_marks, t_vae, t_end, (t_encode, t_encoded),
                            cache.calls(len(scheduler.timesteps)))
    return family_output(decoded, timings, None,
                         [*prompt.warnings, *filter(None, [cache.note(len(scheduler.timesteps))])])


def denoiser_io(spec: ModelSpec) -> GraphIO:
    """Flux's transformer inputs plus the context: the engine's profile spans noise and context tokens, each over
    the model's whole size range (so twice Flux's token count at a given size)."""
    base = flux.denoiser_io(spec)
    channels = spec.components["transformer"].config["in_channels"]
    inputs = list(base.inputs)
    inputs.insert(1, TensorSpec("image_latents", ("batch", "ctx_tokens", channels), "compute"))
    inputs.insert(next(i for i, t in enumerate(inputs) if t.name == "img_ids") + 1,
                  TensorSpec("image_ids", ("ctx_tokens", 3), "compute"))
    return GraphIO(tuple(inputs), base.outputs)


def first_step(steps: int, strength: float) -> int:
    """An edit runs every step (there is no strength)."""
    return 0


KONTEXT = ModelFamily(
    kind=Family.KONTEXT,
    denoiser="transformer",
    text_encoders=flux.TEXT_ENCODERS,
    keep_16bit=flux.FLUX.keep_16bit,
    compile_whole_denoiser=False,
    adapters={**flux.FLUX.adapters, "transformer": graphs.KontextDenoiser},
    quantized_compute=flux.FLUX.quantized_compute,
    fp16_overflows=flux.FLUX.fp16_overflows,
    text_io=flux.FLUX.text_io,
    denoiser_io=denoiser_io,
    samplers=flux.SAMPLERS,
    example_prompts=("make the sky red", "turn the cat into a tiger, keep the pose", "remove the people in the background"),
    generate=generate,
    first_step=first_step,
    image_use=ImageUse.CONTEXT,
    context_size=context_size,
    fp8_attention=flux.FLUX.fp8_attention,  # the same transformer class
    fast_cache=flux.FAST_CACHE,  # demo-kontext, 100 held-out edits at 28 steps: 82% right cached and uncached
)
