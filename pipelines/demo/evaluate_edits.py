"""Edit accuracy of demo-kontext on held-out edits, per edit kind and precision, through diffusers' FluxKontextPipeline.

    python -m pipelines.demo evaluate-edits --model models/demo-kontext --n 200 --precision bf16 fp8 fp4

An edit is right when the output scores all correct against the TARGET scene (`scorer.score`): the asked
attribute changed as asked and every other one kept. Edit i is rendered with seed i from a render of its
source. FP8 / FP4 replace the transformer's Linear layers as Prism's torch backend does
(`pipelines.quant.quantize_linears`, the Flux family's 16-bit anchors kept).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from ..cpu_math import CpuMath, measure_cpu_math
from ..families.flux import FLUX
from ..loading import cast
from ..precision import FP4_WEIGHTS_ONLY, Backend, Precision, SupportLevel, precision_support
from ..quant import quantize_linears
from .architectures import IMAGE_SIZE, T5_TOKENS
from .edits import Edit, EditKind, held_out_edits
from .scenes import render
from .scorer import score
from .train import vae_round_trip

PRECISIONS = ("bf16", "fp8", "fp4")


@dataclass(frozen=True)
class EditEvalRow:
    precision: str
    runs_as: str
    n: int
    accuracy: float  # share of edits whose output is the target scene, every attribute right
    per_kind: dict  # EditKind value -> the same share among edits of that kind
    seconds: float


def edit_accuracy(images: Sequence[Image.Image], edits: Sequence[Edit]) -> dict[str, float]:
    """All-correct rate against the targets, overall ("all") and per edit kind present."""
    if len(images) != len(edits) or not edits:
        raise ValueError(f"need as many images as edits, and at least one; got {len(images)} and {len(edits)}")
    right = [score(image, edit.target).all_correct for image, edit in zip(images, edits)]
    rates = {"all": sum(right) / len(right)}
    for kind in EditKind:
        mine = [ok for ok, edit in zip(right, edits) if edit.kind is kind]
        if mine:
            rates[kind.value] = sum(mine) / len(mine)
    return rates


def round_trip_accuracy(vae, edits: Sequence[Edit], device: str) -> float:
    """All-correct rate of the edits' TARGET scenes encoded and decoded by `vae`: the most an editor that draws
    through this VAE can score on them."""
    decoded = vae_round_trip(vae, [edit.target for edit in edits], device)
    return sum(score(image, edit.target).all_correct for image, edit in zip(decoded, edits)) / len(edits)


def load_editor(folder: Path, precision: str, device: str, cpu: CpuMath | None = None):
    """FluxKontextPipeline at `folder` with bf16 weights on `device`, its transformer quantized for fp8 / fp4;
    returns (pipeline, what the precision runs as). On a CPU without fast bf16 math (`cpu`, measured) the
    arithmetic is FP32, as Prism's manager does it there."""
    from diffusers import FluxKontextPipeline

    p = Precision.parse(precision)
    capability = torch.cuda.get_device_capability(device) if device.startswith("cuda") else None
    support = precision_support(p, capability, Backend.TORCH, cpu)
    if not support.runnable:
        raise ValueError(support.reason)
    compute = torch.float32 if cpu is not None and not cpu.fast_bf16 else torch.bfloat16
    pipe = FluxKontextPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    for module in pipe.components.values():  # not pipe.to(dtype): diffusers' false "kept in float32: []" warning
        if isinstance(module, torch.nn.Module):
            cast(module, compute, device)
    pipe.set_progress_bar_config(disable=True)
    native_fp4 = p is Precision.FP4 and support.level is SupportLevel.NATIVE
    report = quantize_linears(pipe.transformer, p, FLUX.keep_16bit, compute, native_fp4=native_fp4)
    runs_as = support.runs_as if report.native_fp4 == native_fp4 else FP4_WEIGHTS_ONLY
    return pipe, runs_as


def edit_images(pipe, edits: Sequence[Edit], steps: int = 20) -> list[Image.Image]:
    """Each edit applied to a render of its source, edit i with seed i, at the demo's 64x64."""
    images = []
    for i, edit in enumerate(edits):
        # max_area and _auto_resize off: the pipeline would otherwise resize to its ~1 MP preferred resolutions.
        images.append(pipe(image=render(edit.source, IMAGE_SIZE), prompt=edit.instruction, height=IMAGE_SIZE,
                           width=IMAGE_SIZE, max_area=IMAGE_SIZE ** 2, _auto_resize=False, num_inference_steps=steps,
                           max_sequence_length=T5_TOKENS, generator=torch.Generator("cpu").manual_seed(i)).images[0])
    return images


def evaluate_edits(folder: Path, n: int, device: str, precisions: Sequence[str] = PRECISIONS,
                   steps: int = 20) -> list[EditEvalRow]:
    edits = held_out_edits(n)
    cpu = None if device.startswith("cuda") else measure_cpu_math()
    rows = []
    for precision in precisions:
        started = time.monotonic()
        pipe, runs_as = load_editor(folder, precision, device, cpu)
        rates = edit_accuracy(edit_images(pipe, edits, steps), edits)
        rows.append(EditEvalRow(precision, runs_as, n, rates.pop("all"), rates, time.monotonic() - started))
        del pipe
    return rows


def ceiling_line(folder: Path, n: int, device: str) -> str:
    """One sentence with `round_trip_accuracy` of the saved pipeline's VAE on the same `n` held-out edits."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).to(device).eval()
    rate = round_trip_accuracy(vae, held_out_edits(n), device)
    return (f"VAE round trip of the {n} target scenes: {rate:.1%} all correct (the most an editor drawing through "
            "this VAE can score).")


def markdown(rows: Sequence[EditEvalRow]) -> str:
    kinds = [k.value for k in EditKind]
    lines = ["| precision | runs as | edits | all kinds | " + " | ".join(kinds) + " |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in kinds) + " |"]
    for r in rows:
        cells = " | ".join(f"{r.per_kind[k]:.0%}" if k in r.per_kind else "-" for k in kinds)
        lines.append(f"| {r.precision} | {r.runs_as} | {r.n} | {r.accuracy:.1%} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo evaluate-edits")
    parser.add_argument("--model", default="models/demo-kontext", help="folder of a saved FluxKontextPipeline")
    parser.add_argument("--n", type=int, default=200, help="held-out edits (the kinds in turn)")
    parser.add_argument("--precision", "--precisions", dest="precisions", nargs="+", default=list(PRECISIONS),
                        choices=PRECISIONS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    folder = Path(args.model)
    if not (folder / "model_index.json").is_file():
        parser.error(f"--model {folder} holds no saved pipeline (no model_index.json); train one with "
                     "'python -m pipelines.demo train --family kontext --init models/demo-flux --out models'")
    if args.n < 1 or args.steps < 1:
        parser.error(f"--n and --steps must be at least 1, got {args.n} and {args.steps}")
    try:
        rows = evaluate_edits(folder, args.n, args.device, args.precisions, args.steps)
    except ValueError as error:  # a precision this device cannot run: precision_support says which to choose
        parser.error(str(error))
    for row in rows:
        print(json.dumps(asdict(row)), flush=True)
    table = markdown(rows) + "\n\n" + ceiling_line(folder, args.n, args.device)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
