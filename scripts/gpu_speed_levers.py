"""Issue 17 on the GPU, in one device call: each PyTorch speed lever alone and all together, and step caching,
at 1024x1024 on full-size random weights (nothing downloaded). Flux.1-dev FP8 (28 steps) and SDXL base fp16 (30
steps, CFG): the diffusers-eager 16-bit reference (also the image every row is compared with, same seed), today's
default (compile only), SDXL without fused QKV (before and after today's row), the VAE decoder compiled alone,
FP8 attention alone (Flux), CUDA graphs alone, the bf16 VAE alone (SDXL: Flux's VAE is bf16 already), all on,
and all on with `--cache fast`. Rows run most important first; a row that would start past --budget seconds is listed
as not run, so the call ends in time and partial results are printed and written after every row.

    python scripts/gpu_speed_levers.py --out $OUT                   # on the H200, about 8-9 minutes cold
    python scripts/gpu_speed_levers.py --only sdxl --out $OUT       # one family per call, if a call is short
    python scripts/gpu_speed_levers.py --device cpu --models demo-flux demo-sdxl --size 64 --steps 9   # smoke run

Needs diffusers 0.42.1 and importlib_metadata on the device (no torchao, no cache-dit), and nvidia-cudnn-frontend
for the FP8-attention rows (without it they run without, and the probe line says why). The compiled kernels go
to the engine cache's torch-inductor/ folder, so a second call on a warm machine skips most compile time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipelines.backends.contract import TorchOptions  # noqa: E402
from pipelines.bench import EAGER, BenchRow, _measure, difference_text, with_difference  # noqa: E402
from pipelines.cli import build_parser  # noqa: E402
from pipelines.config import manager_config  # noqa: E402
from pipelines.manager import PipelineManager  # noqa: E402

PROMPT = "a photo of a red fox in a snowy forest, golden hour"
TODAY = TorchOptions(compile=True, cuda_graphs=False, bf16_vae=False)  # the default (fused QKV on for SDXL on a GPU)
GRAPHS = TorchOptions(compile=True, cuda_graphs=True, bf16_vae=False)
VAE = TorchOptions(compile=True, cuda_graphs=False, bf16_vae=True)
ALL_ON = TorchOptions(compile=True, cuda_graphs=True, bf16_vae=True, fp8_attention=True, compile_vae=True)
VAE_COMPILED = TorchOptions(compile=True, cuda_graphs=False, bf16_vae=False, compile_vae=True)
FP8_ATTENTION = TorchOptions(compile=True, cuda_graphs=False, bf16_vae=False, fp8_attention=True)


@dataclass(frozen=True)
class Config:
    label: str
    precision: str
    options: TorchOptions
    cache: str = "off"
    reference: bool = False  # its image is what the other rows of the model are compared with


def plan(family: str, sixteen: str, quantized: str) -> list[Config]:
    """The rows of one model, most important first (the last ones are skipped when time runs out)."""
    rows = [Config(f"reference: diffusers eager {sixteen}", sixteen, EAGER, reference=True),
            Config(f"today: {quantized} + compile", quantized, TODAY)]
    if family == "sdxl":
        # around today's row, so that an effect of the order (2026-12-07: the first compiled row of a call was the
        # slow one each time) shows as two different "without" rows rather than as the lever's cost
        unfused = replace(TODAY, fused_qkv=False)
        rows.insert(1, Config(f"without fused QKV: {quantized} + compile", quantized, unfused))
        rows.append(Config(f"again, without fused QKV: {quantized} + compile", quantized, unfused))
    rows.append(Config(f"VAE compiled alone: {quantized} + compile", quantized, VAE_COMPILED))
    if family == "flux":
        rows.append(Config(f"FP8 attention alone: {quantized} + compile", quantized, FP8_ATTENTION))
    extra = " + bf16 VAE" if family == "sdxl" else " + FP8 attention"
    rows += [Config(f"all on: {quantized} + compile + CUDA graphs + VAE compiled{extra}", quantized, ALL_ON),
             Config("all on + cache fast", quantized, ALL_ON, cache="fast")]
    if family == "sdxl":  # Flux's VAE already runs in bf16, so its CUDA-graphs-alone row is its all-on row
        rows += [Config(f"CUDA graphs alone: {quantized}", quantized, GRAPHS),
                 Config(f"bf16 VAE alone: {quantized} + compile", quantized, VAE)]
    return rows


def bench_args(model: str, size: int, steps: int | None, device: str, runs: int, engine_cache: str | None):
    argv = ["bench", PROMPT, "--model", model, "--width", str(size), "--height", str(size), "--seed", "1",
            "--runs", str(runs), "--warmup", "1", "--device", device]
    if steps:
        argv += ["--steps", str(steps)]
    if engine_cache:
        argv += ["--engine-cache", engine_cache]
    if model not in ("demo-flux", "demo-sdxl"):
        argv.append("--random-weights")
    return build_parser().parse_args(argv)


def fp8_attention_probe() -> dict[str, str]:
    """What this machine offers for FP8 attention (pipelines/fp8_attention.py)."""
    from pipelines.fp8_attention import fp8_attention_problem

    probe = {"torch": torch.__version__, "cudnn": str(torch.backends.cudnn.version())}
    try:
        import cudnn
        probe["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
    except Exception as exc:
        probe["cudnn_frontend"] = f"absent ({type(exc).__name__})"
    probe["cuDNN FP8 attention"] = fp8_attention_problem("cuda") or "usable"
    return probe


def table(rows: list[dict]) -> str:
    lines = ["| model | config | runs as | backend | step ms | text ms | VAE ms | total ms | peak GiB | load+compile s | "
             "total vs today | PSNR dB / SSIM vs 16-bit |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    today = {r["model"]: r["total_ms"] for r in rows if r["label"].startswith("today") and not r["error"]}
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['model']} | {r['label']} | not run: {r['error']} |" + " - |" * 9)
            continue
        ratio = f"{today[r['model']] / r['total_ms']:.2f}x" if r["model"] in today and r["total_ms"] else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['label']} | {r['runs_as']} | {r['backend']} | {r['step_ms']:.1f} | "
                     f"{r['text_ms']:.0f} | {r['vae_ms']:.0f} | {r['total_ms']:.0f} | {peak} | {r['load_ms'] / 1000:.0f} | "
                     f"{ratio} | {difference_text(BenchRow(**{k: v for k, v in r.items() if k != 'elapsed_s'}))} |"
                     + (f" ⚠ {'; '.join(r['warnings'])}" if r["warnings"] else ""))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs=2, default=["flux.1-dev", "sdxl-base-1.0"], metavar=("FLUX", "SDXL"))
    p.add_argument("--only", choices=["flux", "sdxl"], default=None)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="default: the model's (28 Flux.1-dev, 30 SDXL)")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds; later rows are not started after this (a cold compile row can take 2.5 min more)")
    p.add_argument("--engine-cache", default=None, help="default: engine_cache/ (its torch-inductor/ keeps kernels)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for speed_levers.json")
    args = p.parse_args()

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = [("flux", args.models[0], "bf16", "fp8"), ("sdxl", args.models[1], "fp16", "fp16")]
    if args.only:
        families = [f for f in families if f[0] == args.only]
    probe = fp8_attention_probe()
    print(f"FP8 attention probe: {probe}", flush=True)
    rows: list[dict] = []
    for family, model, sixteen, quantized in families:
        bench = bench_args(model, args.size, args.steps, args.device, args.runs, args.engine_cache)
        reference = None
        manager, options = None, None
        for config in plan(family, sixteen, quantized):
            elapsed = time.perf_counter() - started
            if elapsed > args.budget:
                row = BenchRow(label=config.label, precision=config.precision, runs_as="-", backend="-", text_ms=0,
                               step_ms=0, steps=0, vae_ms=0, total_ms=0, wall_ms=0, load_ms=0, peak_gib=None,
                               model=model, error=f"time budget ({args.budget:.0f} s) spent")
                image = None
            else:
                if config.options != options:  # a lever is fixed when a model loads: a new manager, all unloaded
                    if manager is not None:
                        manager.unload()
                        manager.close()
                        torch.cuda.empty_cache()
                    manager = PipelineManager(manager_config(bench, backend="torch", torch=config.options,
                                                             lora_paths=True))
                    options = config.options
                row, image = _measure(manager, bench, model, config.precision, config.label, cache=config.cache)
                if config.reference:
                    reference = image
                else:
                    row = with_difference(row, image, reference)
            rows.append({**asdict(row), "elapsed_s": round(time.perf_counter() - started, 1)})
            print(f"[{rows[-1]['elapsed_s']:.0f} s] {row}", flush=True)
            (out / "speed_levers.json").write_text(json.dumps(
                {"rows": rows, "probe": probe, "size": args.size, "device": torch.cuda.get_device_name()
                 if torch.cuda.is_available() else "CPU", "date": time.strftime("%Y-%m-%d")}, indent=2))
        if manager is not None:
            manager.unload()
            manager.close()
            torch.cuda.empty_cache()
    print(table(rows))
    (out / "speed_levers.md").write_text(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
