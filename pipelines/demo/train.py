"""Train the embedded demo models on synthetic scenes and save them in the Hugging Face pipeline layout.

    python -m pipelines.demo train --family flux sdxl --out models --minutes 4

Order per model: the VAE first (reconstruction + a small KL term), its latent statistics set the
scaling (and for Flux the shift) factor, then the denoiser and the text encoders together, from
scratch, on freshly rendered scenes every step (no dataset on disk, no repeat):
- Flux: rectified flow (velocity = noise - latents), logit-normal timesteps as in SD3/FLUX training.
- SDXL: epsilon prediction on the scaled-linear DDPM schedule, 10% of captions dropped to zero
  embeddings so classifier-free guidance works with the pipeline's zeroed empty negative prompt.
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

from ..flux import image_ids, pack
from .architectures import IMAGE_SIZE, T5_TOKENS, FluxParts, SdxlParts, new_flux, new_sdxl
from .scenes import caption, render_batch, sample_scene

UNCOND_RATE = 0.1


@dataclass(frozen=True)
class TrainConfig:
    family: str  # "flux" | "sdxl"
    out_dir: Path
    device: str = "cuda"
    batch: int = 128
    vae_steps: int = 1500
    denoiser_minutes: float = 3.0  # wall-clock cap for the denoiser phase
    max_denoiser_steps: int = 20000
    lr: float = 4e-4
    seed: int = 0
    log_every: int = 250
    workers: int = 0  # processes drawing scenes ahead of the GPU


def _scene_batch(seed: int, index: int, size: int):
    rng = np.random.default_rng([seed, index])
    scenes = [sample_scene(rng) for _ in range(size)]
    return scenes, [caption(s) for s in scenes]


class SceneStream:
    """Endless batches of (images in [-1, 1] on the device, captions), drawn from the training split.

    Sampling scenes is Python and costs about as much as a training step of these small models, so
    worker processes draw batches ahead (batch k always from seed [seed, k]: reproducible whatever the
    number of workers); the device renders them. Spawned, not forked: a fork of a process that has
    initialised CUDA is unsafe.
    """

    AHEAD = 32

    def __init__(self, seed: int, batch: int, device: str, workers: int = 0):
        self.seed, self.batch, self.device, self.index = seed, batch, device, 0
        self.pool = multiprocessing.get_context("spawn").Pool(workers) if workers else None
        self.pending: collections.deque = collections.deque()

    def _fill(self) -> None:
        while len(self.pending) < self.AHEAD:
            self.pending.append(self.pool.apply_async(_scene_batch, (self.seed, self.index, self.batch)))
            self.index += 1

    def next(self) -> tuple[torch.Tensor, list[str]]:
        if self.pool is None:
            scenes, captions = _scene_batch(self.seed, self.index, self.batch)
            self.index += 1
        else:
            self._fill()
            scenes, captions = self.pending.popleft().get()
        return render_batch(scenes, IMAGE_SIZE, self.device), captions

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)


def _schedule(step: int, total: int, warmup: int = 200) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.9 + 0.1


def train_vae(vae, stream: SceneStream, cfg: TrainConfig, log) -> tuple[float, float]:
    """Returns (mean, std) of the latents, for the pipeline's shift and scaling factors."""
    vae.to(cfg.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * _schedule(step, cfg.vae_steps, 100)
        images, _ = stream.next()
        with _autocast(cfg.device):
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon.float(), images) + 0.5 * F.l1_loss(recon.float(), images) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(stream.next()[0]).latent_dist.mean.float() for _ in range(8)])
    return float(latents.mean()), float(latents.std())


def _tokens(tokenizer, captions: list[str], length: int, device: str) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids.to(device)


def train_flux(parts: FluxParts, stream: SceneStream, cfg: TrainConfig, log) -> int:
    device = cfg.device
    mean, std = train_vae(parts.vae, stream, cfg, log)
    parts.vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    modules = [parts.text_encoder, parts.text_encoder_2, parts.transformer]
    for m in modules:
        m.to(device).train()
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    side = IMAGE_SIZE // 4  # latent side
    img_ids = image_ids(side, side, torch.device(device), torch.float32)
    txt_ids = torch.zeros(T5_TOKENS, 3, device=device)
    deadline, step = time.monotonic() + cfg.denoiser_minutes * 60, 0
    while step < cfg.max_denoiser_steps and time.monotonic() < deadline:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _schedule(step, cfg.max_denoiser_steps)
        images, captions = stream.next()
        with torch.no_grad():
            latents = (parts.vae.encode(images).latent_dist.sample() - mean) / std
        target_tokens = pack(latents)
        noise = torch.randn_like(target_tokens)
        t = torch.sigmoid(torch.randn(len(captions), device=device))  # logit-normal timesteps
        noisy = (1 - t[:, None, None]) * target_tokens + t[:, None, None] * noise
        with _autocast(device):
            pooled = parts.text_encoder(_tokens(parts.tokenizer, captions, 77, device)).pooler_output
            text = parts.text_encoder_2(_tokens(parts.tokenizer_2, captions, T5_TOKENS, device))[0]
            velocity = parts.transformer(hidden_states=noisy, encoder_hidden_states=text, pooled_projections=pooled,
                                         timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = F.mse_loss(velocity.float(), noise - target_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % cfg.log_every == 0:
            log(f"flux step {step}: loss {loss.item():.4f}")
        step += 1
    for m in modules:
        m.eval().requires_grad_(False)
    return step


def train_sdxl(parts: SdxlParts, stream: SceneStream, cfg: TrainConfig, log) -> int:
    device = cfg.device
    _, std = train_vae(parts.vae, stream, cfg, log)
    parts.vae.register_to_config(scaling_factor=1.0 / std)
    modules = [parts.text_encoder, parts.text_encoder_2, parts.unet]
    for m in modules:
        m.to(device).train()
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    alphas = parts.scheduler.alphas_cumprod.to(device)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32, device=device)
    deadline, step = time.monotonic() + cfg.denoiser_minutes * 60, 0
    while step < cfg.max_denoiser_steps and time.monotonic() < deadline:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _schedule(step, cfg.max_denoiser_steps)
        images, captions = stream.next()
        n = len(captions)
        with torch.no_grad():
            latents = parts.vae.encode(images).latent_dist.sample() / std
        noise = torch.randn_like(latents)
        t = torch.randint(0, len(alphas), (n,), device=device)
        a = alphas[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        keep = (torch.rand(n, device=device) >= UNCOND_RATE).float()
        with _autocast(device):
            ids = _tokens(parts.tokenizer, captions, 77, device)
            hidden_1 = parts.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            out_2 = parts.text_encoder_2(_tokens(parts.tokenizer_2, captions, 77, device), output_hidden_states=True)
            text = torch.cat([hidden_1, out_2.hidden_states[-2]], dim=-1) * keep[:, None, None]
            pooled = out_2.text_embeds * keep[:, None]
            eps = parts.unet(noisy, t, encoder_hidden_states=text,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(n, 1)},
                             return_dict=False)[0]
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % cfg.log_every == 0:
            log(f"sdxl step {step}: loss {loss.item():.4f}")
        step += 1
    for m in modules:
        m.eval().requires_grad_(False)
    return step


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
    }
    (folder / "prism.json").write_text(json.dumps(defaults, indent=2) + "\n")
    (folder / "TRAINING.json").write_text(json.dumps({"denoiser_steps": steps, "image_size": IMAGE_SIZE}, indent=2) + "\n")
    return folder


def train(cfg: TrainConfig, log=print) -> Path:
    torch.manual_seed(cfg.seed)
    # cuDNN's fused attention fails in the backward pass at these small shapes on the H100 (torch 2.11,
    # "mha_graph.execute ... is_good()" seen 2026-11-26); the flash / memory-efficient kernels train fine.
    torch.backends.cuda.enable_cudnn_sdp(False)
    stream = SceneStream(cfg.seed, cfg.batch, cfg.device, workers=cfg.workers)
    started = time.monotonic()
    try:
        if cfg.family == "flux":
            parts = new_flux()
            steps = train_flux(parts, stream, cfg, log)
        else:
            parts = new_sdxl()
            steps = train_sdxl(parts, stream, cfg, log)
    finally:
        stream.close()
    folder = save(parts, cfg.family, cfg.out_dir, steps)
    log(f"{cfg.family}: {steps} denoiser steps, {time.monotonic() - started:.0f} s, saved to {folder}")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo train")
    parser.add_argument("--family", nargs="+", default=["flux", "sdxl"], choices=["flux", "sdxl"])
    parser.add_argument("--out", default="models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=3.0, help="denoiser training time per model")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 2)))
    args = parser.parse_args(argv)
    for family in args.family:
        train(TrainConfig(family=family, out_dir=Path(args.out), device=args.device, batch=args.batch,
                          vae_steps=args.vae_steps, denoiser_minutes=args.minutes, max_denoiser_steps=args.max_steps,
                          workers=args.workers),
              log=lambda m: print(m, flush=True))
