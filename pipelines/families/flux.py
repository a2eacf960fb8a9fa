"""Flux.1 text-to-image, image-to-image and inpainting: encode the prompt (CLIP-L pooled + T5), denoise packed
latents with flow matching, decode.

The loop follows diffusers' FluxPipeline (with an input image FluxImg2ImgPipeline, with a mask
FluxInpaintPipeline) step for step (tests compare them image for image), but
reads its components through `Parts`, so the manager can load them lazily, evict the text encoders
once the prompt is encoded, and swap a TensorRT engine in for any component.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .. import graphs
from ..graphs import GraphIO, TensorSpec
from ..image_input import encode_request_image, latent_mask
from ..registry import Family, ModelSpec
from ..request import GenerationRequest
from ..run_context import Parts, RunContext, StepReports, Stopwatch
from ..sampling import (FamilyOutput, check_finite, family_output, seed_generators, seeded_noise, stage_timings,
                        tokenize, truncation_warning)
from .family import ModelFamily
from .flux_attention import use_fp8_attention
from ..schedulers import Sampler, make_scheduler
from ..step_cache import FAST, NO_CACHE, StepCache, StepOutputs
from ..text_stage import TextStage

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
CLIP_TOKENS = graphs.CLIP_TOKENS


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches as tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(row, column) position of every packed token, for the rotary embedding."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def first_step(steps: int, strength: float) -> int:
    """Image to image starts the schedule here (FluxImg2ImgPipeline.get_timesteps' rounding)."""
    return int(max(steps - min(steps * strength, steps), 0))


@dataclass(frozen=True)
class EncodedPrompt:
    pooled: torch.Tensor  # CLIP-L pooled (1, D)
    text: torch.Tensor  # T5 hidden states (1, S, D)
    warnings: tuple[str, ...]  # about prompts cut to fit
    # clock marks around the encoding (loading excluded: it is the job's load time); one mark twice when remembered
    marks: tuple


def encode_prompt(spec: ModelSpec, parts: Parts, prompt: str, device: torch.device, clock: Stopwatch) -> EncodedPrompt:
    """The prompt through CLIP-L and T5 (or as an earlier job encoded it); the text encoders are released after."""
    stage = TextStage(parts, clock, TEXT_ENCODERS, ("tokenizer", "tokenizer_2"))
    pooled, text, warnings = stage.encoded(("flux", prompt, spec.max_prompt_tokens),
                                           lambda: _run_encoders(spec, parts, prompt, device))
    return EncodedPrompt(pooled, text, warnings, stage.done())


def _run_encoders(spec: ModelSpec, parts: Parts, prompt: str,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """CLIP-L's pooled output, T5's hidden states, and notes about a prompt cut to fit."""
    warnings = []
    clip_ids, cut_clip = tokenize(parts.get("tokenizer"), prompt, CLIP_TOKENS)
    t5_ids, cut_t5 = tokenize(parts.get("tokenizer_2"), prompt, spec.max_prompt_tokens)
    if cut_t5:
        warnings.append(truncation_warning("T5", spec.max_prompt_tokens))
    elif cut_clip:
        warnings.append(f"CLIP sees only the first {CLIP_TOKENS} tokens of the prompt; T5 sees all of it.")
    pooled = parts.get("text_encoder")(input_ids=clip_ids.to(device))
    text = parts.get("text_encoder_2")(input_ids=t5_ids.to(device))
    return pooled, text, tuple(warnings)


def latent_grid(spec: ModelSpec, width: int, height: int) -> tuple[int, int]:
    """Latent (height, width) for an image size: even, so 2x2 patches pack."""
    scale = spec.vae_scale_factor
    return 2 * (height // (scale * 2)), 2 * (width // (scale * 2))


def scaled_latents(spec: ModelSpec, encoded: torch.Tensor) -> torch.Tensor:
    """VAE latents to the transformer's scale (shifted, then scaled)."""
    vae_config = spec.components["vae"].config
    return (encoded - vae_config.get("shift_factor", 0.0)) * vae_config["scaling_factor"]


def flow_schedule(spec: ModelSpec, parts: Parts, req: GenerationRequest, h: int, w: int, device: torch.device):
    """A fresh scheduler for the job, its sigmas shifted for the number of noise tokens (FluxPipeline's mu)."""
    scheduler = make_scheduler(parts.get("scheduler"), spec.family, req.sampler)  # fresh state per job
    cfg = scheduler.config
    mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / req.steps, req.steps), mu=mu, device=device)
    return scheduler


def text_conditioning(spec: ModelSpec, prompt: EncodedPrompt, req: GenerationRequest, h: int, w: int,
                      device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The transformer's inputs besides the latents and the timestep, for a batch of `req.num_images`."""
    n, pooled, text = req.num_images, prompt.pooled, prompt.text
    cond = dict(
        encoder_hidden_states=text.to(dtype).repeat(n, 1, 1),
        pooled_projections=pooled.to(dtype).repeat(n, 1),
        img_ids=image_ids(h, w, device, dtype),
        txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
    )
    if spec.components["transformer"].config.get("guidance_embeds", False):
        cond["guidance"] = torch.full([n], req.guidance, device=device, dtype=torch.float32)
    return cond


def denoise(parts: Parts, scheduler, timesteps: torch.Tensor, latents: torch.Tensor, cond: dict, ctx: RunContext,
            clock: Stopwatch, blend: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
            cache: StepCache = NO_CACHE):
    """The flow-matching loop: (final latents, a clock mark before and after every step). `blend(i, latents)`,
    when given, rewrites the latents after step i (inpainting keeps the input outside the mask); steps `cache`
    skips reuse earlier velocities (step caching)."""
    n, dtype = latents.shape[0], latents.dtype
    denoiser = parts.get("transformer")
    outputs = StepOutputs(cache, len(timesteps))  # step caching: some steps reuse earlier velocities
    step_marks = [clock.mark()]
    reports = StepReports(ctx, clock, step_marks, (0, len(timesteps)))
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            ctx.check_cancelled()
            velocity = outputs.at(i, t, lambda: denoiser(hidden_states=latents, timestep=(t.expand(n).to(dtype) / 1000),
                                                         **cond))
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            if blend is not None:
                latents = blend(i, latents)
            reports.step_done()
        reports.all_done()
    check_finite(latents, "transformer", "Try bf16, or a lower guidance.")
    return latents, step_marks


def decode(spec: ModelSpec, parts: Parts, latents: torch.Tensor, h: int, w: int, ctx: RunContext,
           clock: Stopwatch) -> tuple[torch.Tensor, tuple]:
    """Packed latents to pixels in [-1, 1], checked finite; and the clock marks around the decoding."""
    ctx.report("vae", 0, 1, "decoding")
    vae = parts.get("vae")
    vae_config = spec.components["vae"].config
    t_vae = clock.mark()
    with torch.inference_mode():
        unscaled = unpack(latents, h, w) / vae_config["scaling_factor"] + vae_config.get("shift_factor", 0.0)
        decoded = vae(latents=unscaled.to(parts.dtype("vae")))
    t_end = clock.mark()
    check_finite(decoded, "VAE decoder", "Try bf16.")
    return decoded, (t_vae, t_end)


def generate(spec: ModelSpec, parts: Parts, req: GenerationRequest, ctx: RunContext) -> FamilyOutput:
    device, n = ctx.device, req.num_images
    seeds = tuple(req.seed + i for i in range(n))
    clock = Stopwatch(device)

    # 1. Encode the prompt once; every image of the batch shares it.
    ctx.report("text", 0, 1, "encoding the prompt")
    prompt = encode_prompt(spec, parts, req.prompt, device, clock)

    # 2. Schedule; an input image starts it part way, where `strength` of the noise is left.
    dtype = parts.dtype("transformer")
    h, w = latent_grid(spec, req.width, req.height)
    channels = spec.components["transformer"].config["in_channels"] // 4
    scheduler = flow_schedule(spec, parts, req, h, w, device)
    start = first_step(req.steps, req.strength) if req.image is not None else 0
    scheduler.set_begin_index(start)
    timesteps = scheduler.timesteps[start:]

    # 3. Starting latents: noise, or the encoded input image with noise mixed in to the first step's level.
    generators = seed_generators(seeds)
    canvas = blend = None
    t_encode = clock.mark()
    if req.image is not None:
        canvas, encoded = encode_request_image(parts, req, generators, ctx)
        image_latents = pack(scaled_latents(spec, encoded).to(dtype))
    t_encoded = clock.mark()
    noise = pack(seeded_noise(generators, (channels, h, w), device, dtype))
    latents = noise if canvas is None else scheduler.scale_noise(image_latents, timesteps[:1].repeat(n), noise)
    if canvas is not None and canvas.mask is not None:  # inpainting: 1 where the step's result is kept
        mask = pack(latent_mask(canvas.mask, h, w, device, dtype).repeat(n, channels, 1, 1))

        def blend(i: int, latents: torch.Tensor) -> torch.Tensor:  # outside the mask, the input noised to step i+1
            kept = image_latents if i == len(timesteps) - 1 else \
                scheduler.scale_noise(image_latents, timesteps[i + 1:i + 2], noise)
            return (1 - mask) * kept + mask * latents
    cond = text_conditioning(spec, prompt, req, h, w, device, dtype)

    # 4. Denoise.
    cache = StepCache.named(req.cache, FAST_CACHE)
    latents, step_marks = denoise(parts, scheduler, timesteps, latents, cond, ctx, clock, blend, cache)

    # 5. Decode.
    decoded, (t_vae, t_end) = decode(spec, parts, latents, h, w, ctx, clock)

    encode = (t_encode, t_encoded) if req.image is not None else None
    timings = stage_timings(clock, *prompt.marks, step_marks, t_vae, t_end, encode, cache.calls(len(timesteps)))
    return family_output(decoded, timings, canvas, [*prompt.warnings, *filter(None, [cache.note(len(timesteps))])])


def denoiser_io(spec: ModelSpec) -> GraphIO:
    """The transformer's inputs and outputs, as `generate` calls it."""
    tokens = spec.max_prompt_tokens
    cfg = spec.components["transformer"].config
    inputs = [TensorSpec("hidden_states", ("batch", "img_tokens", cfg["in_channels"]), "compute"),
              TensorSpec("encoder_hidden_states", ("batch", tokens, cfg["joint_attention_dim"]), "compute"),
              TensorSpec("pooled_projections", ("batch", cfg["pooled_projection_dim"]), "compute"),
              TensorSpec("timestep", ("batch",), "compute"),
              TensorSpec("img_ids", ("img_tokens", 3), "compute"),
              TensorSpec("txt_ids", (tokens, 3), "compute")]
    if cfg.get("guidance_embeds", False):
        inputs.append(TensorSpec("guidance", ("batch",), "float32"))
    return GraphIO(tuple(inputs), ("velocity",))


# Flow matching: flow-match Euler and the sigma schedules diffusers offers for it.
SAMPLERS = (
    Sampler("Euler", "FlowMatchEulerDiscreteScheduler"),
    Sampler("Euler Karras", "FlowMatchEulerDiscreteScheduler", MappingProxyType({"use_karras_sigmas": True})),
    Sampler("Euler Exponential", "FlowMatchEulerDiscreteScheduler", MappingProxyType({"use_exponential_sigmas": True})),
)
EXAMPLES = ("a red fox sitting in fresh snow at sunrise, soft light, detailed fur",
            "a neon sign that says \"Prism\" on a rainy street at night, reflections on wet asphalt",
            "a watercolor painting of a lighthouse on a cliff, gentle waves")

# "Fast (cached)": 28 steps run the transformer 11 times (3 first, every 4th between, 2 last); a skipped step
# extends the last two velocities (flow matching's velocity changes smoothly with time). demo-flux, 50 held-out
# captions at 28 steps against the uncached image (CPU, 2026-12-02, BENCHMARKS.md): 52.6 dB PSNR with
# extrapolation vs 49.6 dB holding the last velocity at the same 11 calls, and 53.2 dB for the earlier schedule
# of 17 calls (every other step, held); every schedule kept every caption attribute the uncached images got.
FAST_CACHE = StepCache(FAST, warmup=3, final=2, every=4, min_steps=8, extrapolate=True)

FLUX = ModelFamily(
    kind=Family.FLUX,
    denoiser="transformer",
    text_encoders=TEXT_ENCODERS,
    # The embedders and the final projection stay 16-bit at FP8/FP4: the layers the TensorRT demo and
    # ModelOpt's Flux recipe also leave unquantized.
    keep_16bit=("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"),
    # Flux's time is in its 57 repeated blocks, so compiling those alone (one graph per block kind)
    # gives the whole-model speed in a fraction of the compile time.
    compile_whole_denoiser=False,
    adapters={"text_encoder": graphs.ClipPooled, "text_encoder_2": graphs.T5Hidden,
              "transformer": graphs.FluxDenoiser, "vae": graphs.VaeDecoder},
    quantized_compute=torch.bfloat16,
    # T5 overflows in fp16 (NaN embeddings: diffusers #8604, candle #2480).
    fp16_overflows=("text_encoder_2",),
    text_io={"text_encoder": (CLIP_TOKENS, ("pooled",)), "text_encoder_2": (None, ("hidden",))},
    denoiser_io=denoiser_io,
    samplers=SAMPLERS,
    example_prompts=EXAMPLES,
    generate=generate,
    first_step=first_step,
    fast_cache=FAST_CACHE,
    fp8_attention=use_fp8_attention,
    lora_reader="FluxPipeline",
    lora_components=("transformer", "text_encoder"),
)
