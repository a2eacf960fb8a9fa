"""Train a small LoRA for an embedded demo model, so a fresh machine shows a LoRA doing something.

    python -m pipelines.demo train-lora --family flux sdxl --models models --out loras --minutes 3

The variation is a striped background (`scenes.striped`): the same scenes and captions as the demo
models were trained on, drawn with dark diagonal bands on the background. The LoRA learns it as a style
(captions unchanged), so any prompt with `<lora:demo-flux-stripes:1>` gets stripes. Only the adapters
train (rank-`rank` pairs on the attention projections of the denoiser, initialised to zero so training
starts from the demo model); the model itself is not changed. Saved in the diffusers/PEFT layout that
Prism (and diffusers) load, at most 2 MB. At the end, the effect is measured through Prism itself:
`scenes.stripe_strength` of held-out prompts generated with and without the LoRA.

Training needs a GPU for a useful result (minutes on an H200); on a CPU the same path runs a few steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .architectures import FluxParts, SdxlParts
from .scenes import held_out_captions, stripe_strength, striped
from .train import SceneStream, TrainConfig, _train_denoiser, flux_loss, load_parts, sdxl_loss

MAX_LORA_BYTES = 2 * 2**20
STYLES = {"stripes": striped}
# The denoiser's attention projections: what most published LoRAs adapt.
TARGETS = re.compile(r"attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")


@dataclass(frozen=True)
class LoraTrainConfig:
    family: str  # "flux" | "sdxl"
    models: Path  # the folder holding demo-<family>
    out_dir: Path  # where <model>-<style>.safetensors goes (Prism's loras/ folder)
    style: str = "stripes"
    rank: int = 8
    device: str = "cuda"
    batch: int = 256
    minutes: float = 3.0
    max_steps: int = 100_000
    lr: float = 1e-3
    seed: int = 0
    workers: int = 0
    log_every: int = 100
    eval_prompts: int = 16  # held-out prompts the effect is measured on (0: skip)

    @property
    def model_dir(self) -> Path:
        return self.models / f"demo-{self.family}"

    @property
    def lora_path(self) -> Path:
        return self.out_dir / f"demo-{self.family}-{self.style}.safetensors"


class LoraLinear(nn.Module):
    """base(x) + up(down(x)): a frozen Linear with a trainable rank-r update (alpha = rank, so scale 1)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.empty(rank, base.in_features))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: training starts at the base model
        nn.init.kaiming_uniform_(self.down, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))


def add_adapters(denoiser: nn.Module, rank: int) -> dict[str, LoraLinear]:
    """Freeze `denoiser` and wrap its attention projections; returns layer path -> adapter."""
    denoiser.requires_grad_(False)
    adapters = {}
    for name, module in list(denoiser.named_modules()):
        if isinstance(module, nn.Linear) and TARGETS.search(name):
            parent, _, child = name.rpartition(".")
            adapter = LoraLinear(module, rank)
            setattr(denoiser.get_submodule(parent), child, adapter)
            adapters[name] = adapter
    return adapters


def save_lora(adapters: dict[str, LoraLinear], prefix: str, path: Path) -> Path:
    tensors = {}
    for name, adapter in adapters.items():
        tensors[f"{prefix}.{name}.lora_A.weight"] = adapter.down.detach().to("cpu", torch.float16).contiguous()
        tensors[f"{prefix}.{name}.lora_B.weight"] = adapter.up.detach().to("cpu", torch.float16).contiguous()
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > MAX_LORA_BYTES:
        raise ValueError(f"The LoRA would be {size / 2**20:.1f} MB, over the 2 MB budget; lower --rank.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


class StyledStream:
    """Training batches of `stream` drawn in a style (the LoRA's variation)."""

    def __init__(self, stream: SceneStream, style):
        self.stream, self.style = stream, style

    @property
    def waited(self) -> float:
        return self.stream.waited

    def next(self):
        batch = self.stream.next()
        return dataclasses.replace(batch, images=self.style(batch.images))

    def close(self) -> None:
        self.stream.close()


def train_lora(cfg: LoraTrainConfig, log=print) -> Path:
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.enable_cudnn_sdp(False)  # as train.py: cuDNN attention fails backwards at these shapes
    started = time.monotonic()
    kind, denoiser, loss = ((FluxParts, "transformer", flux_loss) if cfg.family == "flux"
                            else (SdxlParts, "unet", sdxl_loss))
    parts = load_parts(kind, cfg.model_dir)
    for module in vars(parts).values():
        if isinstance(module, nn.Module):
            module.to(cfg.device).eval().requires_grad_(False)
    adapters = add_adapters(getattr(parts, denoiser), cfg.rank)
    stream = StyledStream(SceneStream(cfg.seed + 20_000, cfg.batch, cfg.device, workers=cfg.workers), STYLES[cfg.style])
    train_cfg = TrainConfig(family=cfg.family, out_dir=cfg.out_dir, device=cfg.device, batch=cfg.batch,
                            denoiser_minutes=cfg.minutes, max_denoiser_steps=cfg.max_steps, lr=cfg.lr, ema=0.0,
                            seed=cfg.seed, log_every=cfg.log_every)
    try:
        steps = _train_denoiser(f"{cfg.family} LoRA", [getattr(parts, denoiser)], loss(parts, cfg.device), stream,
                                train_cfg, log)
    finally:
        stream.close()
    path = save_lora(adapters, denoiser, cfg.lora_path)
    log(f"{cfg.family} LoRA ({cfg.style}, rank {cfg.rank}): {steps} steps, {time.monotonic() - started:.0f} s, "
        f"{path.stat().st_size / 1e6:.2f} MB, saved to {path}")
    if cfg.eval_prompts:
        plain, styled = measure_effect(cfg)
        log(f"stripe strength of {cfg.eval_prompts} held-out prompts through Prism: {plain:.3f} without the LoRA, "
            f"{styled:.3f} with it")
    return path


def measure_effect(cfg: LoraTrainConfig) -> tuple[float, float]:
    """`stripe_strength` of held-out prompts generated by Prism without and with the LoRA (same seeds)."""
    from ..manager import ManagerConfig, PipelineManager
    from ..request import GenerationRequest

    manager = PipelineManager(ManagerConfig(device=cfg.device, lora_dir=cfg.out_dir))
    try:
        strengths = []
        for loras in ((), ((cfg.lora_path.stem, 1.0),)):
            images = [manager.generate(GenerationRequest(prompt=prompt, model=str(cfg.model_dir), seed=i, loras=loras,
                                                         precision="fp16" if cfg.family == "sdxl" else "bf16")).images[0]
                      for i, prompt in enumerate(held_out_captions(cfg.eval_prompts))]
            strengths.append(stripe_strength(images))
    finally:
        manager.close()
    return strengths[0], strengths[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo train-lora")
    parser.add_argument("--family", nargs="+", default=["flux", "sdxl"], choices=["flux", "sdxl"])
    parser.add_argument("--models", default="models", help="folder holding demo-flux / demo-sdxl")
    parser.add_argument("--out", default="loras", help="where demo-<family>-<style>.safetensors is written")
    parser.add_argument("--style", default="stripes", choices=sorted(STYLES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=3.0, help="training time per model")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts the effect is measured on")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    for family in args.family:
        train_lora(LoraTrainConfig(family=family, models=Path(args.models), out_dir=Path(args.out), style=args.style,
                                   rank=args.rank, device=args.device, batch=args.batch, minutes=args.minutes,
                                   max_steps=args.max_steps, lr=args.lr, eval_prompts=args.eval_prompts,
                                   workers=args.workers),
                   log=lambda m: print(m, flush=True))
