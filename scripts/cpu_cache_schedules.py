"""Step-caching schedules on the demo models: what each costs in quality against the uncached image.

    python scripts/cpu_cache_schedules.py [--captions 50] [--edits 100] [--models demo-kontext ...]

demo-flux and demo-sdxl render held-out caption i with seed i at the steps of the real models (28 for Flux,
30 for SDXL), uncached and under each candidate schedule (every 2nd / 3rd / 4th middle step runs the model,
the others holding its last output or extending its last two); the scorer checks every caption attribute, and
PSNR / SSIM are against the uncached image at the same seed. demo-kontext does the same on held-out edits
(an edit is right when the output is its target scene). Each family's shipped schedule (`FAST_CACHE` in its
module under pipelines/families/) is swapped for each candidate in turn; that is all this script changes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.demo.architectures import IMAGE_SIZE  # noqa: E402
from pipelines.demo.edits import held_out_edits  # noqa: E402
from pipelines.demo.evaluate_edits import edit_accuracy  # noqa: E402
from pipelines.demo.scenes import held_out_captions, render  # noqa: E402
from pipelines.demo.scorer import adherence  # noqa: E402
from pipelines.families import flux, sdxl  # noqa: E402
from pipelines.imagemetrics import psnr, ssim  # noqa: E402
from pipelines.manager import ManagerConfig, PipelineManager  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402
from pipelines.step_cache import FAST, StepCache  # noqa: E402

CANDIDATES = [(f"every {every}, {'extend' if extend else 'hold'}",
               StepCache(FAST, warmup=3, final=2, every=every, min_steps=8, extrapolate=extend))
              for every in (2, 3, 4) for extend in (False, True)]


def quality(images, reference) -> dict:
    values = [psnr(a, b) for a, b in zip(images, reference)]
    finite = [v for v in values if v != float("inf")] or [float("inf")]
    return {"psnr": round(sum(finite) / len(finite), 2), "min_psnr": round(min(finite), 2),
            "ssim": round(sum(ssim(a, b) for a, b in zip(images, reference)) / len(images), 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--captions", type=int, default=50)
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--models", nargs="+", choices=["demo-flux", "demo-sdxl", "demo-kontext"],
                   default=["demo-flux", "demo-sdxl", "demo-kontext"], help="e.g. only the one retrained")
    args = p.parse_args()
    manager = PipelineManager(ManagerConfig(device="cpu", max_queue=1))
    captions, edits = held_out_captions(args.captions), held_out_edits(args.edits)
    jobs = {  # model -> (its family module, steps, requests, how a set of images is scored)
        "demo-flux": (flux, 28, [dict(prompt=c) for c in captions], lambda ims: adherence(ims, captions)["all_correct_rate"]),
        "demo-sdxl": (sdxl, 30, [dict(prompt=c) for c in captions], lambda ims: adherence(ims, captions)["all_correct_rate"]),
        "demo-kontext": (flux, 28, [dict(prompt=e.instruction, image=render(e.source, IMAGE_SIZE)) for e in edits],
                         lambda ims: edit_accuracy(ims, edits)["all"]),
    }
    try:
        for model in args.models:
            family, steps, requests, right = jobs[model]
            shipped = family.FAST_CACHE

            def run(cache: str) -> list:
                return [manager.generate(GenerationRequest(model=model, seed=i, steps=steps, precision="bf16",
                                                           cache=cache, **fields)).images[0]
                        for i, fields in enumerate(requests)]

            reference = run("off")
            print(json.dumps({"model": model, "schedule": "uncached", "calls": steps, "right": right(reference)}), flush=True)
            try:
                for name, candidate in CANDIDATES:
                    family.FAST_CACHE = candidate
                    images = run("fast")
                    print(json.dumps({"model": model, "schedule": name, "calls": candidate.calls(steps),
                                      "shipped": candidate == shipped, "right": right(images),
                                      **quality(images, reference)}), flush=True)
            finally:
                family.FAST_CACHE = shipped
    finally:
        manager.close()


if __name__ == "__main__":
    main()
