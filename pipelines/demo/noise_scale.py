"""The gradient noise scale of demo-kontext's training loss at a saved model (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training", appendix A): the batch size past which more edits a step stop buying
fewer steps. Runs on the CPU in FP32 (a few minutes):

    python -m pipelines.demo noise-scale models/demo-kontext [--small 16 --big 128 --small-batches 16 --big-batches 4]

From the mean squared gradient norm at two batch sizes, E|G_B|^2 = |G|^2 + tr(S)/B gives the true gradient's
|G|^2 and the per-edit noise tr(S); B_noise = tr(S)/|G|^2. Gradients are of the trained parameters (both text
encoders and the transformer) under `kontext_train.kontext_loss`, on fresh training batches.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .architectures import FluxParts
from .kontext_train import EditStream, check_init, extend_vocabulary, kontext_loss
from .train import load_parts


def noise_scale(small_square: float, big_square: float, small: int, big: int) -> tuple[float, float, float]:
    """(|G|^2, tr(S), B_noise) from the mean squared gradient norms at batch sizes `small` < `big`."""
    true_gradient = (big * big_square - small * small_square) / (big - small)
    noise = (small_square - big_square) / (1 / small - 1 / big)
    return true_gradient, noise, noise / true_gradient


def mean_square_gradient(loss_of, params: list, batch: int, seeds: range) -> float:
    total = 0.0
    for seed in seeds:
        for p in params:
            p.grad = None
        loss_of(EditStream(seed, batch, "cpu").next()).backward()
        total += sum(float((p.grad.float() ** 2).sum()) for p in params if p.grad is not None)
    return total / len(seeds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo noise-scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a saved demo-flux or demo-kontext folder")
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--big", type=int, default=128)
    parser.add_argument("--small-batches", type=int, default=16)
    parser.add_argument("--big-batches", type=int, default=4)
    args = parser.parse_args(argv)
    if not 0 < args.small < args.big or args.small_batches < 1 or args.big_batches < 1:
        parser.error("need 0 < --small < --big and at least one batch of each")
    try:
        check_init(args.model)
    except ValueError as error:
        parser.error(str(error).replace("--init", "MODEL"))
    torch.manual_seed(0)
    parts = extend_vocabulary(load_parts(FluxParts, args.model))
    parts.vae.float().eval().requires_grad_(False)
    modules = [parts.text_encoder, parts.text_encoder_2, parts.transformer]
    for m in modules:
        m.float().train()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    loss_of = kontext_loss(parts, "cpu")
    started = time.monotonic()
    small = mean_square_gradient(loss_of, params, args.small, range(100, 100 + args.small_batches))
    big = mean_square_gradient(loss_of, params, args.big, range(200, 200 + args.big_batches))
    true_gradient, noise, scale = noise_scale(small, big, args.small, args.big)
    print(f"{args.model}: |G_{args.small}|^2 {small:.4g} ({args.small_batches} batches), |G_{args.big}|^2 {big:.4g} "
          f"({args.big_batches}); |G|^2 {true_gradient:.4g}, tr(S) {noise:.4g}: B_noise {scale:.0f} "
          f"({time.monotonic() - started:.0f} s)")
