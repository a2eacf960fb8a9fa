"""Prompt adherence of the demo models on held-out captions at each precision, and image error vs 16-bit.

    python -m pipelines.demo evaluate --models demo-flux demo-sdxl --n 200 [--device cuda] [--markdown out.md]
    python -m pipelines.demo evaluate --precisions bf16 --caches off fast   # what step caching costs
    python -m pipelines.demo evaluate --models demo-flux --precisions bf16 fp8 --fp8-attention   # and FP8 attention

Caption i is rendered with seed i, so every figure is reproducible. The 16-bit reference is bf16 for
both models (what their FP8/FP4 variants are compared with in the table's PSNR/SSIM columns).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

from ..backends.contract import TorchOptions
from ..imagemetrics import psnr, ssim
from ..manager import ManagerConfig, PipelineManager
from ..request import GenerationRequest
from .scenes import held_out_captions
from .scorer import adherence

PRECISIONS = ("bf16", "fp8", "fp4")


@dataclass(frozen=True)
class EvalRow:
    model: str
    precision: str
    runs_as: str
    n: int
    all_correct: float  # every attribute of the caption right
    mean_fraction: float  # share of attributes right, averaged over images
    per_attribute: dict
    psnr_vs_16bit: float | None
    ssim_vs_16bit: float | None
    seconds: float
    cache: str = "off"


def render(manager: PipelineManager, model: str, precision: str, captions: list[str], cache: str = "off"):
    images, runs_as = [], ""
    for i, text in enumerate(captions):
        result = manager.generate(GenerationRequest(prompt=text, model=model, precision=precision, seed=i, cache=cache))
        images.append(result.images[0])
        runs_as = result.runs_as
    return images, runs_as


def evaluate(models: list[str], n: int, device: str, precisions=PRECISIONS, caches=("off",),
             torch: TorchOptions = TorchOptions()) -> list[EvalRow]:
    captions = held_out_captions(n)
    manager = PipelineManager(ManagerConfig(device=device, max_queue=1, torch=torch))
    rows = []
    try:
        for model in models:
            reference = None
            for precision, cache in [(p, c) for p in precisions for c in caches]:
                started = time.monotonic()
                images, runs_as = render(manager, model, precision, captions, cache)
                scores = adherence(images, captions)
                if reference is None:
                    reference = images
                    quality = (None, None)
                else:
                    pairs = list(zip(images, reference))
                    finite = [psnr(a, b) for a, b in pairs]
                    finite = [p for p in finite if p != float("inf")] or [float("inf")]
                    quality = (sum(finite) / len(finite), sum(ssim(a, b) for a, b in pairs) / len(pairs))
                rows.append(EvalRow(model, precision, runs_as, n, scores["all_correct_rate"], scores["mean_fraction"],
                                    scores["per_attribute"], *quality, time.monotonic() - started, cache))
                print(json.dumps(asdict(rows[-1])), flush=True)
    finally:
        manager.close()
    return rows


def markdown(rows: list[EvalRow]) -> str:
    lines = ["| model | precision | runs as | all attributes right | attributes right | colour | kind | position | "
             "size | background | PSNR vs bf16 | SSIM vs bf16 |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        a = r.per_attribute
        q = (f"{r.psnr_vs_16bit:.1f} dB", f"{r.ssim_vs_16bit:.3f}") if r.psnr_vs_16bit is not None else ("-", "-")
        label = r.precision + (f" + cache {r.cache}" if r.cache != "off" else "")
        lines.append(f"| {r.model} | {label} | {r.runs_as} | {r.all_correct:.1%} | {r.mean_fraction:.1%} | "
                     f"{a.get('colour', 0):.0%} | {a.get('kind', 0):.0%} | {a.get('position', 0):.0%} | "
                     f"{a.get('size', 0):.0%} | {a.get('background', 0):.0%} | {q[0]} | {q[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo evaluate")
    parser.add_argument("--models", nargs="+", default=["demo-flux", "demo-sdxl"])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--caches", nargs="+", default=["off"], choices=["off", "fast"],
                        help="step caching settings to render each precision with (pipelines.step_cache)")
    parser.add_argument("--fp8-attention", action="store_true",
                        help="FLUX.1 at FP8 with FP8 attention (emulated on a CPU: its image difference, not its speed)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    table = markdown(evaluate(args.models, args.n, args.device, args.precisions, args.caches,
                              TorchOptions(fp8_attention=args.fp8_attention)))
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
