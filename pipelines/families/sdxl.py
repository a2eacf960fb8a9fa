"""SDXL text-to-image, image-to-image and inpainting: two CLIP encoders, a UNet with text_time conditioning
and classifier-free guidance, a VAE.

Follows diffusers' StableDiffusionXLPipeline (with an input image StableDiffusionXLImg2ImgPipeline, with a
mask StableDiffusionXLInpaintPipeline on the base model's 4-channel UNet, with a refiner the hand-off in
sdxl_refiner.py) step for step (tests compare them image for image)
and reads its components through `Parts`, like the Flux loop.
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from types import MappingProxyType

import torch

from .. import graphs
from ..graphs import GraphIO, TensorSpec
from ..image_input import encode_request_image, latent_mask
from ..registry import Family, ModelSpec
from ..request import GenerationRequest
from ..run_context import Parts, RunContext, StepReports, Stopwatch
from ..sampling import (FamilyOutput, check_finite, family_output, seed_generators, seeded_noise, stage_timings,
                        tokenize, truncation_warning)
from . import sdxl_refiner
from .family import REFINER_PREFIX, ModelFamily
from .sdxl_attention import fuse_qkv_projections
from ..schedulers import Sampler, make_scheduler
from ..step_cache import FAST, NO_CACHE, StepCache, StepOutputs
from ..text_stage import TextStage

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _encode(parts: Parts, prompt: str, max_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both encoders' penultimate hidden states side by side, OpenCLIP-bigG's pooled output, whether it was cut."""
    ids_1, cut = tokenize(parts.get("tokenizer"), prompt, max_length)
    hidden_1 = parts.get("text_encoder")(input_ids=ids_1.to(device))
    hidden_2, pooled = _encode_2(parts, prompt, max_length, device)
    return torch.cat([hidden_1, hidden_2.to(hidden_1.dtype)], dim=-1), pooled, cut


def _encode_2(parts: Parts, prompt: str, max_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCLIP-bigG alone (`text_encoder_2`): what the refiner reads."""
    ids_2, _ = tokenize(parts.get("tokenizer_2"), prompt, max_length)
    return parts.get("text_encoder_2")(input_ids=ids_2.to(device))


def first_step(steps: int, strength: float) -> int:
    """Image to image starts the schedule here (StableDiffusionXLImg2ImgPipeline.get_timesteps' rounding)."""
    return max(steps - min(int(steps * strength), steps), 0)


def generate(spec: ModelSpec, parts: Parts, req: GenerationRequest, ctx: RunContext) -> FamilyOutput:
    device, n = ctx.device, req.num_images
    seeds = tuple(req.seed + i for i in range(n))
    warnings: list[str] = []
    clock = Stopwatch(device)
    guided = req.guidance > 1.0  # classifier-free guidance doubles the UNet batch
    refine = req.refiner is not None

    # 1. Encode the prompt (and the negative prompt; an empty one is zeros, as SDXL was trained), or reuse what
    #    an earlier job encoded.
    ctx.report("text", 0, 1, "encoding the prompt")
    stage = TextStage(parts, clock, TEXT_ENCODERS, ("tokenizer", "tokenizer_2"))
    max_tokens = spec.max_prompt_tokens
    text, pooled, cut = stage.encoded(("sdxl", req.prompt, max_tokens),
                                      lambda: _encode(parts, req.prompt, max_tokens, device))
    if guided and req.negative_prompt:
        neg_text, neg_pooled, _ = stage.encoded(("sdxl", req.negative_prompt, max_tokens),
                                                lambda: _encode(parts, req.negative_prompt, max_tokens, device))
    elif guided:
        neg_text, neg_pooled = torch.zeros_like(text), torch.zeros_like(pooled)
    if refine:  # the refiner reads text_encoder_2's part; an empty negative prompt is encoded, not zeros
        hidden_2 = text[..., -spec.components["text_encoder_2"].config["hidden_size"]:]
        refiner_negative = None if not guided else stage.encoded(
            ("sdxl refiner", req.negative_prompt, max_tokens),
            lambda: _encode_2(parts, req.negative_prompt, max_tokens, device))
    t_start, t_text = stage.done()
    if cut:
        warnings.append(truncation_warning("CLIP", spec.max_prompt_tokens))

    # 2. Schedule; an input image starts it part way, where `strength` of the noise is left.
    dtype = parts.dtype("unet")
    scale = spec.vae_scale_factor
    channels = spec.components["unet"].config["in_channels"]
    scheduler = make_scheduler(parts.get("scheduler"), spec.family, req.sampler)  # fresh state per job
    scheduler.set_timesteps(req.steps, device=device)
    start = first_step(req.steps, req.strength) * scheduler.order if req.image is not None else 0
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    timesteps = scheduler.timesteps[start:]
    if refine:  # the base stops at the switch; the refiner's own scheduler runs the rest of the same schedule
        timesteps = sdxl_refiner.base_part(timesteps, req.refiner, scheduler.config.num_train_timesteps)
        refiner_scheduler = make_scheduler(parts.get(REFINER_PREFIX + "scheduler"), spec.family, req.sampler)
        refiner_scheduler.set_timesteps(req.steps, device=device)
        refiner_first = sdxl_refiner.refiner_start(refiner_scheduler, req.refiner)
        if hasattr(refiner_scheduler, "set_begin_index"):
            refiner_scheduler.set_begin_index(refiner_first)
        refiner_timesteps = refiner_scheduler.timesteps[refiner_first:]
        sdxl_refiner.check_split(len(timesteps), len(refiner_timesteps), req.refiner, req.steps)
    total_steps = len(timesteps) + (len(refiner_timesteps) if refine else 0)

    # 3. Starting latents: noise, or the encoded input image with noise added to the first step's level.
    generators = seed_generators(seeds)
    canvas = mask = None
    lat_shape = (channels, req.height // scale, req.width // scale)
    t_encode = clock.mark()
    if req.image is not None:
        canvas, encoded = encode_request_image(parts, req, generators, ctx)
        image_latents = spec.components["vae"].config["scaling_factor"] * encoded.to(dtype)
    t_encoded = clock.mark()
    noise = seeded_noise(generators, lat_shape, device, dtype)
    if canvas is None or (canvas.mask is not None and req.strength == 1.0):  # inpainting at 1: pure noise
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(n))
    if canvas is not None and canvas.mask is not None:
        mask = latent_mask(canvas.mask, *lat_shape[1:], device, dtype)
        # StableDiffusionXLInpaintPipeline encodes the masked image next (a draw the 4-channel UNet never uses);
        # drawing as much keeps an ancestral sampler's step noise the same as diffusers'.
        seeded_noise(generators, lat_shape, device, dtype)
    time_ids = torch.tensor([[req.height, req.width, 0, 0, req.height, req.width]], dtype=dtype, device=device)
    cond = dict(encoder_hidden_states=text.to(dtype).repeat(n, 1, 1), text_embeds=pooled.to(dtype).repeat(n, 1),
                time_ids=time_ids.repeat(n, 1))
    if guided:  # unconditional half first, as diffusers orders it
        cond = dict(encoder_hidden_states=torch.cat([neg_text.to(dtype).repeat(n, 1, 1), cond["encoder_hidden_states"]]),
                    text_embeds=torch.cat([neg_pooled.to(dtype).repeat(n, 1), cond["text_embeds"]]),
                    time_ids=time_ids.repeat(2 * n, 1))

    def keep_outside_mask(i: int, latents: torch.Tensor) -> torch.Tensor:
        """Outside the mask, the input image noised to the next step's level."""
        kept = image_latents if i == len(timesteps) - 1 else scheduler.add_noise(image_latents, noise,
                                                                                 timesteps[i + 1:i + 2])
        return (1 - mask) * kept + mask * latents

    # 4. Denoise (with a refiner, the base's part of the schedule, then the refiner's from the base's latents).
    cache = StepCache.named(req.cache, FAST_CACHE)
    if cache.note(len(timesteps)):
        warnings.append(cache.note(len(timesteps)))
    step_marks = [clock.mark()]
    latents = _denoise(parts.get("unet"), scheduler, timesteps, latents, cond, req.guidance if guided else None,
                       generators, ctx, clock, step_marks, (0, total_steps),
                       keep_outside_mask if mask is not None else None, cache)
    check_finite(latents, "UNet", "Try bf16, or a lower guidance.")
    refiner_marks = []
    if refine:
        parts.done_with("unet")  # on a tight budget the refiner may take the base UNet's place
        refiner_unet = parts.get(REFINER_PREFIX + "unet")
        refiner_cond = sdxl_refiner.conditioning(hidden_2, pooled, refiner_negative, n, req.height, req.width,
                                                 parts.dtype(REFINER_PREFIX + "unet"), device)
        refiner_marks = [clock.mark()]
        latents = _denoise(refiner_unet, refiner_scheduler, refiner_timesteps,
                           latents.to(parts.dtype(REFINER_PREFIX + "unet")), refiner_cond,
                           req.guidance if guided else None, generators, ctx, clock, refiner_marks,
                           (len(timesteps), total_steps), cache=cache)
        check_finite(latents, "refiner UNet", "Try bf16, or a lower guidance.")

    # 5. Decode (the SDXL VAE overflows in fp16; the component plan loads it in fp32 then).
    ctx.report("vae", 0, 1, "decoding")
    vae = parts.get("vae")
    t_vae = clock.mark()
    with torch.inference_mode():
        decoded = vae(latents=(latents / spec.components["vae"].config["scaling_factor"]).to(parts.dtype("vae")))
    t_end = clock.mark()
    check_finite(decoded, "VAE decoder", "Try bf16.")

    encode = (t_encode, t_encoded) if req.image is not None else None
    timings = stage_timings(clock, t_start, t_text, step_marks, t_vae, t_end, encode, cache.calls(len(timesteps)))
    if refine:
        refined = tuple(clock.ms(a, b) for a, b in zip(refiner_marks, refiner_marks[1:]))
        timings = replace(timings, steps_ms=timings.steps_ms + refined, refiner_steps=len(refined),
                          model_calls=timings.model_calls + cache.calls(len(refiner_timesteps)))
    return family_output(decoded, timings, canvas, warnings)


def _denoise(unet, scheduler, timesteps: torch.Tensor, latents: torch.Tensor, cond: dict, guidance: float | None,
             generators: list[torch.Generator], ctx: RunContext, clock: Stopwatch, marks: list,
             progress: tuple[int, int], blend=None, cache: StepCache = NO_CACHE) -> torch.Tensor:
    """The UNet over `timesteps` (classifier-free guidance at `guidance`; None: unguided); `blend(i, latents)`
    after each step (inpainting). `progress`: steps done before these, and the job's total. Steps `cache` skips
    reuse earlier guided predictions (step caching), counted within these `timesteps`."""
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    outputs = StepOutputs(cache, len(timesteps))  # step caching: some steps reuse earlier predictions
    reports = StepReports(ctx, clock, marks, progress)

    def predict(t: torch.Tensor) -> torch.Tensor:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if guidance is not None else latents, t)
        eps = unet(sample=model_in, timestep=t, **cond)
        if guidance is None:
            return eps
        eps_uncond, eps_text = eps.chunk(2)
        return eps_uncond + guidance * (eps_text - eps_uncond)

    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            ctx.check_cancelled()
            eps = outputs.at(i, t, lambda: predict(t))
            latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
            if blend is not None:
                latents = blend(i, latents)
            reports.step_done()
        reports.all_done()
    return latents


def denoiser_io(spec: ModelSpec) -> GraphIO:
    """The UNet's inputs and outputs, as `generate` calls it."""
    tokens = spec.max_prompt_tokens
    cfg = spec.components["unet"].config
    time_ids = len(_time_ids_layout(spec))
    time_dims = time_ids * cfg["addition_time_embed_dim"]
    return GraphIO((TensorSpec("sample", ("batch", cfg["in_channels"], "lat_h", "lat_w"), "compute"),
                    TensorSpec("timestep", (), "float32"),  # scheduler.timesteps[i]: a 0-d float32 tensor
                    TensorSpec("encoder_hidden_states", ("batch", tokens, cfg["cross_attention_dim"]), "compute"),
                    TensorSpec("text_embeds", ("batch", cfg["projection_class_embeddings_input_dim"] - time_dims),
                               "compute"),
                    TensorSpec("time_ids", ("batch", time_ids), "compute")), ("noise",))


def _time_ids_layout(spec: ModelSpec) -> tuple[str, ...]:
    """What the UNet's size conditioning holds: the base's original size, crop and target size; the refiner's
    original size, crop and aesthetic score (diffusers' `requires_aesthetics_score`)."""
    if spec.is_refiner:
        return ("height", "width", "crop_top", "crop_left", "aesthetic_score")
    return ("height", "width", "crop_top", "crop_left", "target_height", "target_width")


SAMPLERS = (
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", MappingProxyType({"algorithm_type": "dpmsolver++", "solver_order": 2})),
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler",
            MappingProxyType({"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True})),
    # diffusers' own SDE solver: A1111's "DPM++ SDE" needs torchsde's Brownian tree; this one draws its noise
    # from the job's seeded generators, so a seed still gives the same picture.
    Sampler("DPM++ SDE", "DPMSolverMultistepScheduler",
            MappingProxyType({"algorithm_type": "sde-dpmsolver++", "solver_order": 2})),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("UniPC", "UniPCMultistepScheduler"),
)
EXAMPLES = ("a cozy cabin in a snowy forest at dusk, warm light in the windows, highly detailed",
            "portrait of an old sailor with a grey beard, dramatic lighting, 85mm photo",
            "an isometric illustration of a tiny island city, pastel colors")

# "Fast (cached)": 30 steps run the UNet 18 times (3 first, every other between, 2 last); a skipped step reuses
# the last guided noise prediction. Extending the last two instead, as Flux does, measured worse here (demo-sdxl,
# 50 held-out captions at 30 steps, CPU, 2026-12-02: 46.1 vs 49.7 dB PSNR against uncached at one call in 4,
# 53.9 vs 53.8 dB at every other step), so it holds.
FAST_CACHE = StepCache(FAST, warmup=3, final=2, every=2, min_steps=8)

SDXL = ModelFamily(
    kind=Family.SDXL,
    denoiser="unet",
    text_encoders=TEXT_ENCODERS,
    # The timestep and size embeddings stay 16-bit at FP8/FP4 (convolutions are never quantized by the
    # PyTorch backend).
    keep_16bit=("time_embedding", "add_embedding", "conv_in", "conv_out"),
    # SDXL's UNet is launch-bound in its ResNet blocks and convolutions, which regional compilation (its
    # transformer blocks only) leaves eager. H200, fp16 1024x1024: 59.8 ms/step eager, 60.8 blocks only,
    # 43.4 whole UNet (BENCHMARKS.md), so the whole UNet is compiled.
    compile_whole_denoiser=True,
    adapters={"text_encoder": graphs.ClipPenultimate, "text_encoder_2": graphs.ClipPenultimateAndProjection,
              "unet": graphs.SdxlDenoiser, "vae": graphs.VaeDecoder},
    quantized_compute=torch.float16,
    fp16_overflows=(),
    text_io={"text_encoder": (None, ("hidden",)), "text_encoder_2": (None, ("hidden", "pooled"))},
    denoiser_io=denoiser_io,
    samplers=SAMPLERS,
    example_prompts=EXAMPLES,
    generate=generate,
    first_step=first_step,
    guidance_batch=True,
    negative_prompt=True,
    lora_reader="StableDiffusionXLPipeline",
    lora_components=("unet", "text_encoder", "text_encoder_2"),
    fast_cache=FAST_CACHE,
    fuse_qkv=fuse_qkv_projections,
)
