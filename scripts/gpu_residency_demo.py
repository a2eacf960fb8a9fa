"""Issue 3 on the GPU: Flux.1-dev bf16, then fp8, then SDXL base fp16 (random full-size weights) under a
40 GB budget. Prints every load/evict event and each job's peak memory.

    python scripts/gpu_residency_demo.py [--budget 40GB] [--steps 4]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.manager import ManagerConfig, PipelineManager  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="40GB")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    manager = PipelineManager(ManagerConfig(device="cuda", memory_budget=args.budget, random_weights=True))
    print(f"budget {manager.residency.budget_bytes / 1e9:.1f} GB on {manager.info.describe()}")
    jobs = [("flux.1-dev", "bf16"), ("flux.1-dev", "fp8"), ("sdxl-base-1.0", "fp16"), ("flux.1-dev", "fp8")]
    seen = 0
    for model, precision in jobs:
        started = time.perf_counter()
        result = manager.generate(GenerationRequest(prompt="a lighthouse at dusk", model=model, precision=precision,
                                                    steps=args.steps, seed=0, width=1024, height=1024))
        print(f"\n== {model} {precision}: {time.perf_counter() - started:.1f} s, peak {result.peak_memory_bytes / 1e9:.1f} GB, "
              f"resident after {manager.residency.used_bytes() / 1e9:.1f} GB; {result.timings.summary()}")
        for event in manager.residency.events[seen:]:
            print("   ", event)
        seen = len(manager.residency.events)
        assert manager.residency.used_bytes() <= manager.residency.budget_bytes
    manager.close()


if __name__ == "__main__":
    main()
