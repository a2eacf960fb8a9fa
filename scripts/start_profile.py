"""Issue 17's "first image" targets: where the seconds of one process's first image go (imports, CUDA start, the
manager, loading, the compile stage, the steps, the rest), and within the compile stage, what torch.compile spent
(Dynamo's own timers: tracing, inductor's code generation or its cache, Triton). Run it twice with the same
engine cache for a cold and a warm start:

    for run in cold warm; do python3 scripts/start_profile.py --model flux.1-dev --precision fp8 --steps 28 \\
        --engine-cache /tmp/ec --random-weights --out $OUT/$run; done                 # on the lent GPU
    python3 scripts/start_profile.py --model demo-flux --device cpu --compile --out /tmp/sp   # smoke run

Prints the breakdown and writes OUT/start_profile.json.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # before any import below: the imports are part of what a restart costs

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TORCH_DONE = time.perf_counter()
import diffusers  # noqa: E402,F401
import transformers  # noqa: E402,F401

from pipelines.backends.contract import TorchOptions  # noqa: E402
from pipelines.manager import ManagerConfig, PipelineManager  # noqa: E402
from pipelines.request import GenerationRequest  # noqa: E402

IMPORTS_DONE = time.perf_counter()
PROMPT = "a photo of a red fox in a snowy forest, golden hour"


def dynamo_seconds() -> dict[str, float]:
    """torch.compile's own timers, summed over every compiled region: {timer: seconds}."""
    from torch._dynamo.utils import compile_times

    found = compile_times(repr="csv", aggregate=True)
    if not found:
        return {}
    names, values = found
    return {name: round(float(value), 2) for name, value in zip(names, values)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux.1-dev")
    p.add_argument("--precision", default="fp8")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="compile on a CPU too (a GPU compiles by default)")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--engine-cache", type=Path, default=Path("engine_cache"))
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()

    marks = {"torch import": TORCH_DONE - STARTED, "other imports": IMPORTS_DONE - TORCH_DONE}
    t = time.perf_counter()
    if torch.cuda.is_available() and args.device != "cpu":
        torch.zeros(1, device="cuda")  # the CUDA context, which the manager's probe would start anyway
    marks["CUDA start"] = time.perf_counter() - t
    t = time.perf_counter()
    manager = PipelineManager(ManagerConfig(device=args.device, random_weights=args.random_weights,
                                            engine_cache_dir=args.engine_cache,
                                            torch=TorchOptions(compile=True if args.compile else None)))
    marks["manager"] = time.perf_counter() - t
    stages: dict[str, float] = {}
    last = [time.perf_counter(), None]

    def on_progress(progress) -> None:  # wall seconds in each stage, as the progress bar moves through them
        now = time.perf_counter()
        if last[1] is not None:
            stages[last[1]] = stages.get(last[1], 0.0) + now - last[0]
        last[0], last[1] = now, progress.stage

    t = time.perf_counter()
    request = GenerationRequest(PROMPT, args.model, precision=args.precision, seed=1, steps=args.steps,
                                width=args.size, height=args.size)
    result = manager.generate(request, on_progress=on_progress)
    if last[1] is not None:
        stages[last[1]] = stages.get(last[1], 0.0) + time.perf_counter() - last[0]
    marks["first job"] = time.perf_counter() - t
    t = time.perf_counter()
    manager.close()
    marks["close"] = time.perf_counter() - t
    marks["process so far"] = time.perf_counter() - STARTED
    report = {"marks_s": {k: round(v, 2) for k, v in marks.items()},
              "job_stages_s": {k: round(v, 2) for k, v in stages.items()},
              "timings": result.timings.summary(), "runs_as": result.runs_as,
              "dynamo_s": dynamo_seconds(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "start_profile.json").write_text(json.dumps(report, indent=2))
    for section in ("marks_s", "job_stages_s", "dynamo_s"):
        print(section + ": " + ", ".join(f"{k} {v}" for k, v in report[section].items()))
    print(f"{report['runs_as']}: {report['timings']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
