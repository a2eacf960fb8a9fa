"""What the prompt cache saves: the same prompt at new seeds, with the cache off (every job encodes: the same-run
baseline) and on, per model; the text stage's time and each job's wall time (submit to result), medians of the
repeats after a first job that loads everything. With a --memory-budget too small to keep the text encoders next
to the denoiser, each job without the cache loads them again.

    python scripts/prompt_cache_bench.py --models demo-flux demo-sdxl --device cpu
    python scripts/prompt_cache_bench.py --models flux.1-schnell --random-weights --size 1024 --memory-budget 24GB
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.manager import ManagerConfig, PipelineManager  # noqa: E402
from pipelines.prompt_cache import DEFAULT_ENTRIES  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402

PROMPT = "a photo of a red fox in a snowy forest, golden hour"


def repeats(manager: PipelineManager, args, model: str) -> tuple[float, float, float, str]:
    """(median text ms, median wall ms, median load ms) of the repeats, and what the model ran as."""
    size = {"width": args.size, "height": args.size} if args.size else {}
    text, wall, load = [], [], []
    for seed in range(args.runs + 1):
        started = time.perf_counter()
        result = manager.generate(GenerationRequest(PROMPT, model, args.precision, seed=seed, steps=args.steps, **size))
        if seed:  # the first job loads (and compiles) everything
            wall.append((time.perf_counter() - started) * 1000)
            text.append(result.timings.text_encoders_ms)
            load.append(result.timings.load_ms)
    return statistics.median(text), statistics.median(wall), statistics.median(load), f"{result.runs_as} on {result.device}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["demo-flux", "demo-sdxl"])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--memory-budget", default=None)
    p.add_argument("--random-weights", action="store_true")
    args = p.parse_args()
    print("| model | prompt cache | runs as | text ms | load ms | wall ms per image |\n"
          "| --- | --- | --- | ---: | ---: | ---: |")
    for model in args.models:
        for entries, label in ((0, "off (baseline)"), (DEFAULT_ENTRIES, "on")):
            config = ManagerConfig(device=args.device, memory_budget=args.memory_budget,
                                   random_weights=args.random_weights, prompt_cache_entries=entries)
            manager = PipelineManager(config)
            try:
                text, wall, load, runs_as = repeats(manager, args, model)
            finally:
                manager.close()
            print(f"| {model} | {label} | {runs_as} | {text:.1f} | {load:.0f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
