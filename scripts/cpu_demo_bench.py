"""Demo models on this CPU, per image at default settings: what Prism chooses (16-bit math where the CPU is fast at
it, else FP32 compute) next to the same-run baseline of always computing in bf16 (Prism before 2026-12-01).

    python scripts/cpu_demo_bench.py [--runs 5]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python scripts/cpu_demo_bench.py   # an AVX2-only CPU's kernels
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipelines.cpu_math import FAST_CPU, measure_cpu_math  # noqa: E402
from pipelines.manager import ManagerConfig, PipelineManager  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402

PROMPT = "a small red circle at the top left on a blue background"


def per_image_seconds(manager: PipelineManager, model: str, runs: int) -> tuple[float, str]:
    manager.generate(GenerationRequest(PROMPT, model, "bf16", seed=0))  # load and warm up
    times, runs_as = [], ""
    for seed in range(1, runs + 1):
        start = time.perf_counter()
        result = manager.generate(GenerationRequest(PROMPT, model, "bf16", seed=seed))
        times.append(time.perf_counter() - start)
        runs_as = result.runs_as
    return statistics.median(times), runs_as


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cpu = measure_cpu_math()
    print(f"{cpu.describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"ATen vector ISA {torch.backends.cpu.get_cpu_capability()}")
    print("| model | Prism (measured choice) | runs as | baseline: always bf16 | speed-up |")
    print("| --- | ---: | --- | ---: | ---: |")
    for model in ("demo-flux", "demo-sdxl"):
        rows = {}
        for label, cpu_math in (("prism", None), ("bf16", FAST_CPU)):
            manager = PipelineManager(ManagerConfig(device="cpu", cpu_math=cpu_math))
            try:
                rows[label] = per_image_seconds(manager, model, args.runs)
            finally:
                manager.close()
        (ours, runs_as), (base, _) = rows["prism"], rows["bf16"]
        print(f"| {model} | {ours:.3f} s | {runs_as} | {base:.3f} s | {base / ours:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
