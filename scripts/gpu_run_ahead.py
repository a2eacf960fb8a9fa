"""Issue 17: does letting the host queue a denoising step ahead of the one it reports (ManagerConfig.steps_ahead,
run_context.StepReports) make a job faster, and how does it add to the other step levers? For each lever set
(today's default, SDXL without fused QKV, CUDA graphs, inductor's coordinate-descent tuning, max-autotune) one
manager loads and compiles the model once, then the runs alternate between steps_ahead 0 (each step waited for,
as before) and 1, so both see the same kernels, host and GPU clocks; the order flips each round.

    python3 scripts/gpu_run_ahead.py --model sdxl-base-1.0 --precision fp16 --levers today unfused --out $OUT
    python3 scripts/gpu_run_ahead.py --model flux.1-dev --precision fp8 --levers today --out $OUT
    python3 scripts/gpu_run_ahead.py --model flux.1-dev --precision fp8 --levers today --cache fast --out $OUT
    python3 scripts/gpu_run_ahead.py --device cpu --model demo-sdxl --size 64 --steps 6 --out /tmp/ra   # smoke run

Full-size random weights for Hub models (nothing downloaded). Writes OUT/run_ahead_<model>.json and .md; rows are
printed as they finish, and a lever set that would start past --budget seconds is listed as not run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines.backends.contract import TorchOptions  # noqa: E402
from pipelines.manager import ManagerConfig, PipelineManager  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402

PROMPT = "a photo of a red fox in a snowy forest, golden hour"
LEVERS = {  # today's default: compile, fused QKV for SDXL on a GPU, no CUDA graphs, fp32 SDXL VAE
    "today": TorchOptions(compile=True, cuda_graphs=False, bf16_vae=False),
    "unfused": TorchOptions(compile=True, cuda_graphs=False, bf16_vae=False, fused_qkv=False),
    "graphs": TorchOptions(compile=True, cuda_graphs=True, bf16_vae=False),
    "tuned": TorchOptions(compile=True, cuda_graphs=False, bf16_vae=False),  # + INDUCTOR_FLAGS below
    "autotune": TorchOptions(compile=True, cuda_graphs=False, bf16_vae=False, compile_mode="max-autotune-no-cudagraphs"),
}
# Inductor settings a lever compiles under (measurement only: the app has no such option yet). "tuned": a
# coordinate-descent search over each Triton kernel's block sizes and warps, for the activation quantization's
# row reductions, which run at ~1.3 TB/s where a kernel reading each row once reached 2.2 (BENCHMARKS.md).
# Without its graph cache: on 2026-12-08 the tuned set's first job took 3.8 s against 33 s, kernels from the
# cache the set before had filled, so nothing was tuned.
INDUCTOR_FLAGS = {"tuned": {"coordinate_descent_tuning": True, "fx_graph_cache": False}}


def measure(manager: PipelineManager, request: GenerationRequest, runs: int) -> dict[int, list[dict]]:
    """Runs alternating steps_ahead 0 and 1 (the order flipped each round): per setting, each run's figures."""
    found: dict[int, list[dict]] = {0: [], 1: []}
    for round_ in range(runs):
        for ahead in ((0, 1) if round_ % 2 == 0 else (1, 0)):
            # The manager reads steps_ahead as each job starts; a measuring script may swap it between jobs.
            manager.config = replace(manager.config, steps_ahead=ahead)
            started = time.perf_counter()
            result = manager.generate(request)
            wall = (time.perf_counter() - started) * 1000
            t = result.timings
            found[ahead].append({"step_ms": t.mean_step_ms, "denoise_ms": sum(t.steps_ms), "total_ms": t.total_ms,
                                 "wall_ms": wall, "image": result.images[0].tobytes()})
    return found


def summary(lever: str, ahead: int, runs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"lever": lever, "steps_ahead": ahead, "runs": len(runs), "step_ms": med("step_ms"),
            "denoise_ms": med("denoise_ms"), "total_ms": med("total_ms"), "wall_ms": med("wall_ms"),
            "step_ms_each": [round(r["step_ms"], 2) for r in runs]}


def table(rows: list[dict]) -> str:
    lines = ["| levers | steps ahead | runs | step ms | denoise ms | total ms | wall ms | step ms each run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['lever']} | - | - | not run: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['lever']} | {r['steps_ahead']} | {r['runs']} | {r['step_ms']:.2f} | {r['denoise_ms']:.0f} | "
                     f"{r['total_ms']:.0f} | {r['wall_ms']:.0f} | {r['step_ms_each']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sdxl-base-1.0")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--levers", nargs="+", choices=sorted(LEVERS), default=["today"])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--runs", type=int, default=4, help="rounds; each runs both settings once")
    p.add_argument("--cache", choices=["off", "fast"], default="off",
                   help="step caching: cached steps are short, so the host's share of a step is larger")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; no lever set starts after this")
    p.add_argument("--engine-cache", type=Path, default=Path("engine_cache"))
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    request = GenerationRequest(PROMPT, args.model, precision=args.precision, seed=1, steps=args.steps,
                                width=args.size, height=args.size, backend="torch", cache=args.cache)
    hub = args.model not in ("demo-flux", "demo-sdxl")
    rows: list[dict] = []
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    for lever in args.levers:
        if time.perf_counter() - started > args.budget:
            rows.append({"lever": lever, "error": f"time budget ({args.budget:.0f} s) spent"})
            continue
        manager = PipelineManager(ManagerConfig(device=args.device, backend="torch", random_weights=hub,
                                                engine_cache_dir=args.engine_cache, torch=LEVERS[lever],
                                                prompt_cache_entries=0))
        try:
            # the config is the module's, not the thread's: the manager's worker compiles under it too
            with torch._inductor.config.patch(INDUCTOR_FLAGS.get(lever, {})):
                load_started = time.perf_counter()
                manager.generate(request)  # loads and compiles
                load_s = time.perf_counter() - load_started
                found = measure(manager, request, args.runs)
        finally:
            manager.unload()
            manager.close()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        same = len({r["image"] for runs in found.values() for r in runs}) == 1
        for ahead, runs in found.items():
            rows.append({**summary(lever, ahead, runs), "first_job_s": round(load_s, 1), "same_image": same})
            print(f"[{time.perf_counter() - started:.0f} s] {rows[-1]}", flush=True)
        stem = f"run_ahead_{args.model}" + ("_cache_fast" if args.cache == "fast" else "")
        (args.out / f"{stem}.json").write_text(json.dumps(
            {"rows": rows, "device": device, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
             "size": args.size, "cache": args.cache}, indent=2))
        (args.out / f"{stem}.md").write_text(table(rows) + "\n")
    print(f"{device}, {args.model} {args.precision} {args.size}x{args.size}, step cache {args.cache}")
    print(table(rows))
    print("images identical across settings: " + ", ".join(f"{r['lever']} {r['same_image']}" for r in rows
                                                           if "same_image" in r and r["steps_ahead"] == 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
