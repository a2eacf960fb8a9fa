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
from .architectures import IMAGE_SIZE, T5_TOKENS, FluxParts, SdxlParts, clip_tokenizer, new_flux, new_sdxl, t5_tokenizer
from .scenes import COLOURS, KINDS, MAX_SHAPES, caption, sample_scene, shape_distance

UNCOND_RATE = 0.1


@dataclass(frozen=True)
class TrainConfig:
    family: str  # "flux" | "sdxl"
    out_dir: Path
    device: str = "cuda"
    batch: int = 1024
    vae_steps: int = 500
    denoiser_minutes: float = 3.0  # wall-clock cap for the denoiser phase
    max_denoiser_steps: int = 20000
    lr: float = 8e-4
    seed: int = 0
    log_every: int = 250
    workers: int = 0  # processes drawing scenes ahead of the GPU
    resume: Path | None = None  # continue training a saved demo model (text encoders + denoiser; VAE kept)


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


def _scene_arrays(seed: int, index: int, size: int) -> dict[str, np.ndarray]:
    """Batch `index` as compact arrays (cheap to send between processes) plus both token id arrays."""
    if _WORKER_TOKENIZERS is None:
        _init_worker()
    clip_tok, t5_tok = _WORKER_TOKENIZERS
    rng = np.random.default_rng([seed, index])
    scenes = [sample_scene(rng) for _ in range(size)]
    out = {"background": np.array([_COLOUR_INDEX[s.background] for s in scenes], np.int64)}
    shape = (size, MAX_SHAPES)
    out |= {"present": np.zeros(shape, bool), "kind": np.zeros(shape, np.int64), "colour": np.zeros(shape, np.int64),
            "geometry": np.zeros(shape + (3,), np.float32)}
    for i, scene in enumerate(scenes):
        for slot, shape_ in enumerate(scene.shapes):
            out["present"][i, slot] = True
            out["kind"][i, slot] = KINDS.index(shape_.kind)
            out["colour"][i, slot] = _COLOUR_INDEX[shape_.colour]
            out["geometry"][i, slot] = (*shape_.centre, shape_.extent)
    captions = [caption(s) for s in scenes]
    out["ids_clip"] = clip_tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    out["ids_t5"] = t5_tok(captions, padding="max_length", max_length=T5_TOKENS, truncation=True,
                           return_tensors="np").input_ids
    return out


_COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}


def render_arrays(arrays: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """`render_batch` from `_scene_arrays` tensors: every kind is computed for the whole batch and masked,
    so there is no per-scene Python and no host synchronisation."""
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

    def __init__(self, seed: int, batch: int, device: str, workers: int = 0):
        self.seed, self.batch, self.device, self.index = seed, batch, device, 0
        self.pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) if workers else None
        self.pending: collections.deque = collections.deque()

    def next(self) -> Batch:
        if self.pool is None:
            arrays = _scene_arrays(self.seed, self.index, self.batch)
            self.index += 1
        else:
            while len(self.pending) < self.AHEAD:
                self.pending.append(self.pool.apply_async(_scene_arrays, (self.seed, self.index, self.batch)))
                self.index += 1
            arrays = self.pending.popleft().get()
        tensors = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in arrays.items()}
        return Batch(render_arrays(tensors, IMAGE_SIZE), tensors["ids_clip"], tensors["ids_t5"])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)


def _schedule(step: int, total: int, warmup: int = 200) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.9 + 0.1


def _optimise(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def train_vae(vae, stream: SceneStream, cfg: TrainConfig, log) -> tuple[float, float]:
    """Returns (mean, std) of the latents, for the pipeline's shift and scaling factors."""
    vae.to(cfg.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * _schedule(step, cfg.vae_steps, 100)
        images = stream.next().images
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
        latents = torch.cat([vae.encode(stream.next().images).latent_dist.mean.float() for _ in range(4)])
    return float(latents.mean()), float(latents.std())


def train_flux(parts: FluxParts, stream: SceneStream, cfg: TrainConfig, log) -> int:
    device = cfg.device
    if cfg.resume is None:
        mean, std = train_vae(parts.vae, stream, cfg, log)
        parts.vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    else:  # continuing: the VAE and its latent statistics stay as saved
        parts.vae.to(device).eval().requires_grad_(False)
        mean, std = parts.vae.config.shift_factor, 1.0 / parts.vae.config.scaling_factor
    modules = [parts.text_encoder, parts.text_encoder_2, parts.transformer]
    for m in modules:
        m.to(device).train()
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    side = IMAGE_SIZE // 4  # latent side
    img_ids = image_ids(side, side, torch.device(device), torch.float32)
    txt_ids = torch.zeros(T5_TOKENS, 3, device=device)
    started, step = time.monotonic(), 0
    deadline = started + cfg.denoiser_minutes * 60
    while step < cfg.max_denoiser_steps and time.monotonic() < deadline:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _schedule(step, cfg.max_denoiser_steps)
        batch = stream.next()
        with torch.no_grad():
            latents = (parts.vae.encode(batch.images).latent_dist.sample() - mean) / std
        target_tokens = pack(latents)
        noise = torch.randn_like(target_tokens)
        t = torch.sigmoid(torch.randn(len(latents), device=device))  # logit-normal timesteps
        noisy = (1 - t[:, None, None]) * target_tokens + t[:, None, None] * noise
        with _autocast(device):
            pooled = parts.text_encoder(batch.ids_clip).pooler_output
            text = parts.text_encoder_2(batch.ids_t5)[0]
            velocity = parts.transformer(hidden_states=noisy, encoder_hidden_states=text, pooled_projections=pooled,
                                         timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = F.mse_loss(velocity.float(), noise - target_tokens)
        _optimise(opt, params, loss)
        if step % cfg.log_every == 0:
            log(f"flux step {step}: loss {loss.item():.4f} ({time.monotonic() - started:.0f} s)")
        step += 1
    for m in modules:
        m.eval().requires_grad_(False)
    return step


def train_sdxl(parts: SdxlParts, stream: SceneStream, cfg: TrainConfig, log) -> int:
    device = cfg.device
    if cfg.resume is None:
        _, std = train_vae(parts.vae, stream, cfg, log)
        parts.vae.register_to_config(scaling_factor=1.0 / std)
    else:
        parts.vae.to(device).eval().requires_grad_(False)
        std = 1.0 / parts.vae.config.scaling_factor
    modules = [parts.text_encoder, parts.text_encoder_2, parts.unet]
    for m in modules:
        m.to(device).train()
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    alphas = parts.scheduler.alphas_cumprod.to(device)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32, device=device)
    started, step = time.monotonic(), 0
    deadline = started + cfg.denoiser_minutes * 60
    while step < cfg.max_denoiser_steps and time.monotonic() < deadline:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _schedule(step, cfg.max_denoiser_steps)
        batch = stream.next()
        n = len(batch.images)
        with torch.no_grad():
            latents = parts.vae.encode(batch.images).latent_dist.sample() / std
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
        loss = F.mse_loss(eps.float(), noise)
        _optimise(opt, params, loss)
        if step % cfg.log_every == 0:
            log(f"sdxl step {step}: loss {loss.item():.4f} ({time.monotonic() - started:.0f} s)")
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
    stream = SceneStream(cfg.seed, cfg.batch, cfg.device, workers=cfg.workers)
    started = time.monotonic()
    try:
        if cfg.family == "flux":
            parts = load_parts(FluxParts, cfg.resume) if cfg.resume else new_flux()
            steps = train_flux(parts, stream, cfg, log)
        else:
            parts = load_parts(SdxlParts, cfg.resume) if cfg.resume else new_sdxl()
            steps = train_sdxl(parts, stream, cfg, log)
        steps += previous_steps(cfg.resume)
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
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--resume", default=None,
                        help="continue from saved demo models in this folder (e.g. models): VAE kept, the rest trained")
    parser.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 2)))
    args = parser.parse_args(argv)
    for family in args.family:
        train(TrainConfig(family=family, out_dir=Path(args.out), device=args.device, batch=args.batch,
                          vae_steps=args.vae_steps, denoiser_minutes=args.minutes, max_denoiser_steps=args.max_steps,
                          workers=args.workers, lr=args.lr,
                          resume=Path(args.resume) / f"demo-{family}" if args.resume else None),
              log=lambda m: print(m, flush=True))
