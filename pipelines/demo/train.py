"""Train the embedded demo models on synthetic scenes and save them in the Hugging Face pipeline layout.

    python -m pipelines.demo train --family flux sdxl --out models --vae-minutes 2.2 --minutes 6
    python -m pipelines.demo train --family flux --resume models --out models --minutes 8   # train on
    python -m pipelines.demo train --family kontext --init models/demo-flux --out models --decoder-minutes 2.5 \
        --minutes 14 --batch 256 --lr 8e-4 --cuda-graphs   # the editor (the shipped one: 20 minutes on an H100)

The shipped models (2026-11-26, one H200): both families at once, 2.2 VAE minutes + 5.8 denoiser
minutes each; demo-flux then resumed alone for 8.1 minutes (6270 denoiser steps in all, demo-sdxl 1883).

Order per model: the VAE first (reconstruction weighted towards the shapes + a small KL term), its
latent statistics set the scaling (and for Flux the shift) factor, then the denoiser and the text
encoders together, from scratch, on freshly rendered scenes every step (no dataset on disk, no repeat):
- Flux: rectified flow (velocity = noise - latents), logit-normal timesteps as in SD3/FLUX training.
- SDXL: epsilon prediction on the scaled-linear DDPM schedule, 10% of captions dropped to zero
  embeddings so classifier-free guidance works with the pipeline's zeroed empty negative prompt.
Each phase runs for a wall-clock budget; the learning rate follows warmup + cosine over that budget,
and the denoiser and text encoders are saved as an exponential moving average of their weights.

The VAE bounds everything: a denoiser cannot draw a shape its VAE cannot reconstruct. After the VAE
phase the log prints the adherence score of VAE reconstructions of the held-out scenes (1.0 for the
renders themselves); 500 plain-MSE steps gave 0.74 (demo-flux) and 0.43 (demo-sdxl): blobs; the
shape-weighted loss over 1310 steps of 256 gave 0.984 and 0.986.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..families.flux import image_ids, pack
from ..sampling import decoded_to_images
from .architectures import (IMAGE_SIZE, T5_TOKENS, FluxParts, SdxlParts, caption_words, clip_tokenizer, new_flux, new_sdxl,
                            t5_tokenizer)
from .scenes import COLOURS, KINDS, MAX_SHAPES, caption, held_out_captions, parse_caption, render, sample_scene, shape_distance
from .scorer import adherence

UNCOND_RATE = 0.1
# Shapes cover 2-6% of an image; without extra weight the VAE spends its capacity on the flat
# background and blurs the shapes into blobs (measured: 0.74 / 0.43 adherence of reconstructions).
SHAPE_WEIGHT = 10.0


@dataclass(frozen=True)
class TrainConfig:
    family: str  # "flux" | "sdxl" | "kontext" (kontext_train.py)
    out_dir: Path
    device: str = "cuda"
    batch: int = 1024
    vae_batch: int = 256
    vae_minutes: float = 2.0  # wall-clock budget of the VAE phase
    vae_steps: int = 100_000  # and its step cap
    denoiser_minutes: float = 3.0  # wall-clock budget of the denoiser phase
    max_denoiser_steps: int = 100_000
    lr: float = 8e-4
    ema: float = 0.999  # decay of the saved weights' moving average (0 saves the raw weights)
    seed: int = 0
    log_every: int = 250
    workers: int = 0  # processes drawing scenes ahead of the GPU
    resume: Path | None = None  # continue training a saved demo model (text encoders + denoiser; VAE kept)
    decoder_minutes: float = 0.0  # kontext only: fine-tune the VAE decoder, encoder frozen (`train_decoder`)
    decoder_lr: float = 3e-4
    compile: bool = False  # torch.compile what a step runs: renderer, frozen VAE encoder, trained modules
    probe_minutes: float = 0.0  # kontext only: log the held-out loss this often while training (0: only before and after)
    cuda_graphs: bool = False  # with compile: replay each compiled part of a step as a CUDA graph ("reduce-overhead")

    @property
    def compile_mode(self) -> str | None:
        """torch.compile's mode for what a step runs, or None where it runs eagerly."""
        if not self.compile:
            return None
        # Why: at batch 256 an H100 took 54 ms a step where an H200 took 20 (2026-12-06, BENCHMARKS.md), more
        # than memory bandwidth explains: the host's cost of launching a step's many small kernels, which graphs
        # remove. Measured on an H100 (kontext, batch 256, with the pinned uploads of SceneStream._upload): 48-50
        # steps a second against 18.6 without either; the two were not measured apart, and the first step
        # compiles 101 s with graphs against 73 s without. Off by default: not yet run on a GPU for flux or sdxl.
        return "reduce-overhead" if self.cuda_graphs else "default"


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, 64, 64) in [-1, 1], on the device
    ids_clip: torch.Tensor  # (B, 77) CLIP token ids
    ids_t5: torch.Tensor  # (B, T5_TOKENS) T5 token ids


_WORKER_TOKENIZERS: tuple | None = None


def _init_worker() -> None:
    global _WORKER_TOKENIZERS
    torch.set_num_threads(1)
    _WORKER_TOKENIZERS = (clip_tokenizer(), t5_tokenizer())


def scene_arrays(scenes: list) -> dict[str, np.ndarray]:
    """The scenes as compact arrays (cheap to send between processes), what `render_arrays` draws."""
    out = {"background": np.array([_COLOUR_INDEX[s.background] for s in scenes], np.int64)}
    shape = (len(scenes), MAX_SHAPES)
    out |= {"present": np.zeros(shape, bool), "kind": np.zeros(shape, np.int64), "colour": np.zeros(shape, np.int64),
            "geometry": np.zeros(shape + (3,), np.float32)}
    for i, scene in enumerate(scenes):
        for slot, shape_ in enumerate(scene.shapes):
            out["present"][i, slot] = True
            out["kind"][i, slot] = KINDS.index(shape_.kind)
            out["colour"][i, slot] = _COLOUR_INDEX[shape_.colour]
            out["geometry"][i, slot] = (*shape_.centre, shape_.extent)
    return out


def _scene_arrays(seed: int, index: int, size: int) -> dict[str, np.ndarray]:
    """Batch `index` as compact arrays plus both token id arrays."""
    if _WORKER_TOKENIZERS is None:
        _init_worker()
    clip_tok, t5_tok = _WORKER_TOKENIZERS
    rng = np.random.default_rng([seed, index])
    scenes = [sample_scene(rng) for _ in range(size)]
    out = scene_arrays(scenes)
    captions = [caption(s) for s in scenes]
    out["ids_clip"] = clip_tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    out["ids_t5"] = t5_tok(captions, padding="max_length", max_length=T5_TOKENS, truncation=True,
                           return_tensors="np").input_ids
    return out


_COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}


def render_arrays(arrays: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """The training renderer: (N, 3, size, size) float32 in [-1, 1] from `scene_arrays` tensors, matching
    `scenes.render` up to anti-aliasing. Coverage is 0.5 minus the signed distance in pixels, clamped to
    [0, 1]: a one-pixel ramp that approximates box-filtered coverage without supersampling. Every kind is
    computed for the whole batch and masked, so there is no per-scene Python and no host synchronisation."""
    device = arrays["background"].device
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device) / 127.5 - 1.0
    images = palette[arrays["background"]][:, :, None, None].repeat(1, 1, size, size)
    pixels = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size
    for slot in range(MAX_SHAPES):
        cx, cy, extent = arrays["geometry"][:, slot].unbind(1)
        extent = extent.clamp(min=1e-3)  # absent shapes have zero extent; they are masked out below
        x = (pixels[None, None, :] - cx[:, None, None]) / extent[:, None, None]
        y = (pixels[None, :, None] - cy[:, None, None]) / extent[:, None, None]
        colours = palette[arrays["colour"][:, slot]][:, :, None, None]
        for k, kind in enumerate(KINDS):
            member = (arrays["present"][:, slot] & (arrays["kind"][:, slot] == k)).float()[:, None, None, None]
            alpha = (0.5 - shape_distance(kind, x, y) * (extent * size)[:, None, None]).clamp(0.0, 1.0)[:, None]
            alpha = alpha * member
            images = images * (1.0 - alpha) + colours * alpha
    return images


class SceneStream:
    """Endless training batches drawn from the training split of the scene space.

    Sampling scenes and tokenizing captions is Python and costs more than a step of these small models,
    so worker processes prepare batches ahead (batch k always from seed [seed, k]: reproducible whatever
    the number of workers) as compact arrays; the device renders them. Workers are spawned, not forked:
    a fork of a process that has initialised CUDA is unsafe.
    """

    AHEAD = 24
    # What a worker computes for batch k, (seed, k, size) -> arrays; a module-level function so it pickles.
    draw = staticmethod(_scene_arrays)

    def __init__(self, seed: int, batch: int, device: str, workers: int = 0, compile_mode: str | None = None):
        self.seed, self.batch, self.device, self.index = seed, batch, device, 0
        # Why compiled: eagerly the renderer is ~1250 kernels a batch writing ~22 GB for 2048 scenes (counted on
        # a CPU, 2026-12-02), a fifth of a demo-kontext step's memory traffic; fused, it writes its images once.
        self.render = (torch.compile(render_arrays, fullgraph=True, dynamic=False, mode=compile_mode) if compile_mode
                       else render_arrays)
        self.pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) if workers else None
        self.pending: collections.deque = collections.deque()
        self.waited = 0.0  # seconds spent waiting for scene arrays

    def next(self) -> Batch:
        before = time.monotonic()
        if self.pool is None:
            arrays = self.draw(self.seed, self.index, self.batch)
            self.index += 1
        else:
            while len(self.pending) < self.AHEAD:
                self.pending.append(self.pool.apply_async(self.draw, (self.seed, self.index, self.batch)))
                self.index += 1
            arrays = self.pending.popleft().get()
        self.waited += time.monotonic() - before
        return self.assemble({k: self._upload(torch.from_numpy(v)) for k, v in arrays.items()})

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        # Pinned on a GPU. Why: CUDA syncs the stream before a copy from pageable memory, so the CPU would wait
        # here for the GPU to finish the last step and launch the next step's kernels only after it (step time
        # = launch time + GPU time); from pinned memory the copy queues like a kernel and the launches overlap.
        if torch.device(self.device).type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def assemble(self, tensors: dict[str, torch.Tensor]) -> Batch:
        """The batch from its arrays on the device: here the scenes are rendered."""
        return Batch(self.render(tensors, IMAGE_SIZE), tensors["ids_clip"], tensors["ids_t5"])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)


class Budget:
    """A training phase's end: whichever comes first of a step count and a wall-clock time."""

    def __init__(self, steps: int, minutes: float):
        self.steps, self.seconds, self.started = steps, minutes * 60, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def progress(self, step: int) -> float:
        return min(1.0, max(step / self.steps, self.elapsed() / self.seconds if self.seconds > 0 else 1.0))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def _schedule(step: int, progress: float, warmup: int = 200) -> float:
    """Learning-rate factor: linear warmup, then cosine from 1 to 0.1 over the phase's progress."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * progress)) * 0.9 + 0.1


class Ema:
    """Moving average of parameters; its warmup lets short runs still average over their later steps."""

    def __init__(self, params: list, decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    def copy_to(self) -> None:
        with torch.no_grad():
            for shadow, p in zip(self.shadow, self.params):
                p.copy_(shadow)


def _optimise(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    # After the step, not before the next backward: no gradient outlives its step, whose memory a CUDA graph's
    # next replay (--cuda-graphs) reuses.
    opt.zero_grad(set_to_none=True)


def _shape_weights(images: torch.Tensor) -> torch.Tensor:
    """1 on the background, 1 + SHAPE_WEIGHT on and around shapes. The corner pixel is always background:
    scenes keep every shape at least 0.019 of the image side away from the border."""
    background = images[:, :, :1, :1]
    on_shape = ((images - background).abs().amax(1, keepdim=True) > 0.02).float()
    return 1.0 + SHAPE_WEIGHT * F.max_pool2d(on_shape, 3, stride=1, padding=1)


def _reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Squared plus half absolute error, shapes weighted by `_shape_weights`."""
    error = recon.float() - images
    weights = _shape_weights(images)
    return ((error ** 2 + 0.5 * error.abs()) * weights).mean() / weights.mean()


def train_decoder(vae, images_of, cfg: TrainConfig, log) -> int:
    """Fine-tune the VAE's decoder on `images_of()` batches with the encoder frozen; returns the steps taken.

    The latents stay exactly what they were, so a denoiser trained on them stays valid. Why: the demo VAE
    (2 minutes of training) is the ceiling of what its models draw: round trips of the 200 held-out edit
    targets scored 80.5% all correct (2026-12-02), the misses small stars decoded as blunt pentagons; 33 CPU
    minutes of this (2164 steps of 32-40 images) raised that to 85.5%."""
    vae.to(cfg.device).eval().requires_grad_(False)
    vae.decoder.train().requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    budget, step = Budget(cfg.vae_steps, cfg.decoder_minutes), 0
    while not budget.done(step):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead (no effect without graphs)
        for group in opt.param_groups:
            group["lr"] = cfg.decoder_lr * _schedule(step, budget.progress(step), 100)
        images = images_of()
        with torch.no_grad(), _autocast(cfg.device):
            # Sampled, not the mean: the decoder also meets latents a denoiser drew, never exactly the encoder's.
            latents = vae.encode(images).latent_dist.sample()
        with _autocast(cfg.device):
            recon = vae.decode(latents).sample
        loss = _reconstruction_loss(recon, images)
        _optimise(opt, params, loss)
        if step % cfg.log_every == 0:
            log(f"decoder step {step}: loss {loss.item():.4f} ({budget.elapsed():.0f} s)")
        step += 1
    vae.eval().requires_grad_(False)
    return step


def train_vae(vae, stream: SceneStream, cfg: TrainConfig, log) -> tuple[float, float]:
    """Returns (mean, std) of the latents, for the pipeline's shift and scaling factors."""
    vae.to(cfg.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    budget, step = Budget(cfg.vae_steps, cfg.vae_minutes), 0
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * _schedule(step, budget.progress(step), 100)
        images = stream.next().images
        with _autocast(cfg.device):
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = _reconstruction_loss(recon, images) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0:
            log(f"vae step {step}: loss {loss.item():.4f} ({budget.elapsed():.0f} s)")
        step += 1
    vae.eval().requires_grad_(False)
    log(f"vae: {step} steps, {budget.elapsed():.0f} s; reconstructions of held-out scenes score "
        f"{reconstruction_adherence(vae, cfg.device):.3f}")
    with torch.no_grad():
        latents = torch.cat([vae.encode(stream.next().images).latent_dist.mean.float() for _ in range(4)])
    return float(latents.mean()), float(latents.std())


def vae_round_trip(vae, scenes: list, device: str) -> tuple:
    """The scenes rendered, encoded to their latent mean and decoded by `vae`, as RGB images."""
    images = torch.stack([torch.from_numpy(np.asarray(render(scene, IMAGE_SIZE), np.float32))
                          for scene in scenes]).permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        recon = vae.decode(vae.encode(images.to(device, next(vae.parameters()).dtype)).latent_dist.mode()).sample
    return decoded_to_images(recon)


def reconstruction_adherence(vae, device: str, n: int = 200) -> float:
    """Prompt adherence of VAE round trips of the held-out scenes: the ceiling for the denoiser."""
    captions = held_out_captions(n)
    return adherence(vae_round_trip(vae, [parse_caption(c) for c in captions], device), captions)["mean_fraction"]


def _train_denoiser(name: str, modules: list, loss_of, stream: SceneStream, cfg: TrainConfig, log, probe=None) -> int:
    """The denoiser phase shared by both families: `loss_of(batch)` is the family's objective; `probe()`, when
    given, returns a line logged every cfg.probe_minutes (the loss curve of a long run)."""
    for m in modules:
        m.to(cfg.device).train()
    if cfg.compile:
        # Why: these ~1M-parameter models make many small elementwise kernels that inductor fuses. Measured on an
        # H200 at batch 1024 (2026-12-02, BENCHMARKS.md): demo-kontext 11.9 steps a second with the denoiser
        # compiled against 8.5 eager, for 42 s of compiling (18-21 s from the warm inductor cache); the text
        # encoders, the renderer and the VAE encoder compiled too are not measured yet. The CLI turns it on for a
        # GPU only (not measured on a CPU). In place: the saved weights keep their names.
        for m in modules:
            m.compile(mode=cfg.compile_mode)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]  # a LoRA run trains its adapters only
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = Ema(params, cfg.ema) if cfg.ema else None
    budget, step = Budget(cfg.max_denoiser_steps, cfg.denoiser_minutes), 0
    waited_before = stream.waited  # a stream shared with a decoder phase has waited there already
    probed = 0
    while not budget.done(step):
        if probe is not None and cfg.probe_minutes > 0 and budget.elapsed() >= (probed + 1) * cfg.probe_minutes * 60:
            probed = int(budget.elapsed() // (cfg.probe_minutes * 60))  # one probe after a long step, not a burst
            log(f"{name} step {step} ({budget.elapsed():.0f} s): {probe()}")
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead (no effect without graphs)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _schedule(step, budget.progress(step))
        loss = loss_of(stream.next())
        _optimise(opt, params, loss)
        if ema is not None:
            ema.update(step)
        if step % cfg.log_every == 0:
            log(f"{name} step {step}: loss {loss.item():.4f} ({budget.elapsed():.0f} s, "
                f"{(stream.waited - waited_before) / max(budget.elapsed(), 1e-9):.0%} waiting for scenes)")
        step += 1
    if ema is not None:
        ema.copy_to()
    for m in modules:
        m.eval().requires_grad_(False)
    return step


def train_flux(parts: FluxParts, stream: SceneStream, cfg: TrainConfig, log) -> int:
    return _train_denoiser("flux", [parts.text_encoder, parts.text_encoder_2, parts.transformer], flux_loss(parts, cfg.device),
                           stream, cfg, log)


def flux_loss(parts: FluxParts, device: str):
    """The Flux objective on a batch: rectified flow with logit-normal timesteps."""
    vae = parts.vae
    mean, std = vae.config.shift_factor, 1.0 / vae.config.scaling_factor
    side = IMAGE_SIZE // 4  # latent side
    img_ids = image_ids(side, side, torch.device(device), torch.float32)
    txt_ids = torch.zeros(T5_TOKENS, 3, device=device)

    def loss_of(batch: Batch) -> torch.Tensor:
        with torch.no_grad(), _autocast(device):  # bf16 targets: the encoder was a large share of a step in fp32
            latents = (vae.encode(batch.images).latent_dist.sample().float() - mean) / std
        target_tokens = pack(latents)
        noise = torch.randn_like(target_tokens)
        t = torch.sigmoid(torch.randn(len(latents), device=device))  # logit-normal timesteps
        noisy = (1 - t[:, None, None]) * target_tokens + t[:, None, None] * noise
        with _autocast(device):
            pooled = parts.text_encoder(batch.ids_clip).pooler_output
            text = parts.text_encoder_2(batch.ids_t5)[0]
            velocity = parts.transformer(hidden_states=noisy, encoder_hidden_states=text, pooled_projections=pooled,
                                         timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        return F.mse_loss(velocity.float(), noise - target_tokens)

    return loss_of


def train_sdxl(parts: SdxlParts, stream: SceneStream, cfg: TrainConfig, log) -> int:
    return _train_denoiser("sdxl", [parts.text_encoder, parts.text_encoder_2, parts.unet], sdxl_loss(parts, cfg.device),
                           stream, cfg, log)


def sdxl_loss(parts: SdxlParts, device: str):
    """The SDXL objective on a batch: epsilon prediction, 10% of captions dropped for guidance."""
    vae = parts.vae
    std = 1.0 / vae.config.scaling_factor
    alphas = parts.scheduler.alphas_cumprod.to(device)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32, device=device)

    def loss_of(batch: Batch) -> torch.Tensor:
        n = len(batch.images)
        with torch.no_grad(), _autocast(device):
            latents = vae.encode(batch.images).latent_dist.sample().float() / std
        noise = torch.randn_like(latents)
        t = torch.randint(0, len(alphas), (n,), device=device)
        a = alphas[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        keep = (torch.rand(n, device=device) >= UNCOND_RATE).float()
        with _autocast(device):
            # Both SDXL tokenizers are the same CLIP vocabulary here, so one id array serves both encoders.
            hidden_1 = parts.text_encoder(batch.ids_clip, output_hidden_states=True).hidden_states[-2]
            out_2 = parts.text_encoder_2(batch.ids_clip, output_hidden_states=True)
            text = torch.cat([hidden_1, out_2.hidden_states[-2]], dim=-1) * keep[:, None, None]
            pooled = out_2.text_embeds * keep[:, None]
            eps = parts.unet(noisy, t, encoder_hidden_states=text,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(n, 1)},
                             return_dict=False)[0]
        return F.mse_loss(eps.float(), noise)

    return loss_of


def save(parts: FluxParts | SdxlParts, family: str, out_dir: Path, steps: int) -> Path:
    """Write the model in the exact Hugging Face pipeline layout (fp16 safetensors) plus Prism's defaults."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    folder = out_dir / f"demo-{family}"
    modules = {k: v for k, v in vars(parts).items()}
    for value in modules.values():
        if isinstance(value, torch.nn.Module):
            value.to("cpu", torch.float16)
    pipe = (FluxPipeline if family == "flux" else StableDiffusionXLPipeline)(**modules)
    pipe.save_pretrained(folder, safe_serialization=True)
    defaults = {
        "description": (f"Embedded demo: a {'FLUX.1' if family == 'flux' else 'SDXL'}-architecture model a few MB in size, "
                        "trained on synthetic scenes of coloured shapes (e.g. 'a small red circle at the top left on a "
                        "blue background'). Works with no download."),
        "default_width": IMAGE_SIZE, "default_height": IMAGE_SIZE,
        "size": {"multiple_of": 16, "min_side": 32, "max_side": 128},
        "default_steps": 20 if family == "flux" else 25,
        "default_guidance": 0.0 if family == "flux" else 4.0,
        "max_prompt_tokens": T5_TOKENS if family == "flux" else 77,
        "prompt_grammar": "demo-shapes",  # looser prompts are completed to the captions' form (pipelines.vocabulary)
        "vocabulary": caption_words(),  # the result names a prompt's other words (pipelines.vocabulary)
    }
    (folder / "prism.json").write_text(json.dumps(defaults, indent=2) + "\n")
    (folder / "TRAINING.json").write_text(json.dumps({"denoiser_steps": steps, "image_size": IMAGE_SIZE}, indent=2) + "\n")
    return folder


def load_parts(kind, folder: Path):
    """A saved demo model's components in fp32, ready to train further."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    return kind(**{name: getattr(pipe, name) for name in kind.__dataclass_fields__})


def previous_steps(folder: Path | None) -> int:
    if folder is None or not (folder / "TRAINING.json").is_file():
        return 0
    return int(json.loads((folder / "TRAINING.json").read_text()).get("denoiser_steps", 0))


def train(cfg: TrainConfig, log=print) -> Path:
    torch.manual_seed(cfg.seed)
    # cuDNN's fused attention fails in the backward pass at these small shapes on the H100 (torch 2.11,
    # "mha_graph.execute ... is_good()" seen 2026-11-26); the flash / memory-efficient kernels train fine.
    torch.backends.cuda.enable_cudnn_sdp(False)
    started = time.monotonic()
    kind, new = (FluxParts, new_flux) if cfg.family == "flux" else (SdxlParts, new_sdxl)
    parts = load_parts(kind, cfg.resume) if cfg.resume else new()
    if cfg.resume is None:  # a resumed model keeps its VAE and latent statistics as saved
        vae_stream = SceneStream(cfg.seed + 10_000, cfg.vae_batch, cfg.device, workers=cfg.workers)
        try:
            mean, std = train_vae(parts.vae, vae_stream, cfg, log)
        finally:
            vae_stream.close()
        # Flux pipelines shift and scale latents, SDXL pipelines only scale them.
        parts.vae.register_to_config(scaling_factor=1.0 / std, **({"shift_factor": mean} if cfg.family == "flux" else {}))
    parts.vae.to(cfg.device).eval().requires_grad_(False)
    if cfg.compile:
        parts.vae.encoder.compile(mode=cfg.compile_mode)  # frozen from here on; its GroupNorm/SiLU passes over 64x64 maps fuse
    stream = SceneStream(cfg.seed, cfg.batch, cfg.device, workers=cfg.workers, compile_mode=cfg.compile_mode)
    try:
        steps = (train_flux if cfg.family == "flux" else train_sdxl)(parts, stream, cfg, log)
    finally:
        stream.close()
    steps += previous_steps(cfg.resume)
    folder = save(parts, cfg.family, cfg.out_dir, steps)
    log(f"{cfg.family}: {steps} denoiser steps, {time.monotonic() - started:.0f} s, saved to {folder}")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo train")
    parser.add_argument("--family", nargs="+", default=["flux", "sdxl"], choices=["flux", "sdxl", "kontext"],
                        help="kontext: the editor, fine-tuned from demo-flux (--init) on edit pairs")
    parser.add_argument("--init", default=None,
                        help="kontext only: the demo-flux folder to start from, or a demo-kontext to train further")
    parser.add_argument("--out", default="models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=3.0, help="denoiser training time per model")
    parser.add_argument("--vae-minutes", type=float, default=2.0, help="VAE training time per new model")
    parser.add_argument("--vae-steps", type=int, default=100_000, help="VAE (and decoder) step cap")
    parser.add_argument("--decoder-minutes", type=float, default=0.0,
                        help="kontext only: fine-tune the VAE decoder this long first, "
                             "the encoder (so the latents) kept")
    parser.add_argument("--max-steps", type=int, default=100_000, help="denoiser step cap")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--vae-batch", type=int, default=256)
    parser.add_argument("--ema", type=float, default=0.999, help="decay of the saved weights' moving average; 0: none")
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--resume", default=None,
                        help="continue from saved demo models in this folder (e.g. models): VAE kept, the rest trained")
    parser.add_argument("--eval-edits", type=int, default=60,
                        help="kontext only: held-out edits scored through FluxKontextPipeline at the end (0: none)")
    parser.add_argument("--loss-edits", type=int, default=1024,
                        help="kontext only: held-out edits whose loss is logged before and after training (0: none)")
    parser.add_argument("--probe-minutes", type=float, default=0.0,
                        help="kontext only: also log that held-out loss this often while training (0: never)")
    parser.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 2)))
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                        help="with --compile: replay each compiled part of a step as a CUDA graph "
                             "(kontext on an H100, with the pinned uploads: 2.6x the steps a second of neither)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile what a training step runs: renderer, VAE encoder, text encoders, denoiser "
                             "(default: on a GPU, off on a CPU)")
    args = parser.parse_args(argv)
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    if args.cuda_graphs and not (args.compile and args.device.startswith("cuda")):
        parser.error("--cuda-graphs replays compiled steps on a GPU: use it with --device cuda and without --no-compile")
    if args.minutes < 0 or args.decoder_minutes < 0 or args.probe_minutes < 0:
        parser.error("--minutes, --decoder-minutes and --probe-minutes must be 0 or more, "
                     f"got {args.minutes}, {args.decoder_minutes} and {args.probe_minutes}")
    if args.decoder_minutes and "kontext" not in args.family:
        parser.error("--decoder-minutes sharpens demo-kontext's VAE decoder: use it with --family kontext")
    if args.probe_minutes and "kontext" not in args.family:
        parser.error("--probe-minutes logs demo-kontext's held-out loss: use it with --family kontext")
    if "kontext" in args.family:
        from .kontext_train import check_init

        try:
            check_init(Path(args.init) if args.init else None)
        except ValueError as error:
            parser.error(str(error))
    for family in args.family:
        if family == "kontext":
            from .kontext_train import train_kontext

            train_kontext(TrainConfig(family=family, out_dir=Path(args.out), device=args.device, batch=args.batch,
                                      denoiser_minutes=args.minutes, max_denoiser_steps=args.max_steps,
                                      vae_steps=args.vae_steps, decoder_minutes=args.decoder_minutes,
                                      workers=args.workers, lr=args.lr, ema=args.ema, compile=args.compile,
                                      probe_minutes=args.probe_minutes, cuda_graphs=args.cuda_graphs),
                          Path(args.init), log=lambda m: print(m, flush=True), eval_edits=args.eval_edits,
                          loss_edits=args.loss_edits)
            continue
        train(TrainConfig(family=family, out_dir=Path(args.out), device=args.device, batch=args.batch,
                          vae_batch=args.vae_batch, vae_minutes=args.vae_minutes, vae_steps=args.vae_steps,
                          denoiser_minutes=args.minutes, max_denoiser_steps=args.max_steps,
                          workers=args.workers, lr=args.lr, ema=args.ema, compile=args.compile,
                          cuda_graphs=args.cuda_graphs, resume=Path(args.resume) / f"demo-{family}" if args.resume else None),
              log=lambda m: print(m, flush=True))
