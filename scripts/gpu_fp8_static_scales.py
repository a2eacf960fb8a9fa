"""Issue 17's next lever, measured in one device call: FP8 with calibrated activation scales against per-row ones.

    python scripts/gpu_fp8_static_scales.py --out $OUT        # FLUX.1-dev at 1024x1024 on the H200 (a few minutes cold)
    python scripts/gpu_fp8_static_scales.py --model demo-flux --size 64 --device cpu --no-compile --runs 2 --out /tmp/s

The FLUX.1 transformer as the app loads it at FP8 (random full-size weights: nothing downloaded), run eager over
--calibration inputs (random latents and text, timesteps spread over (0, 1)) while `pipelines.fp8_static` records
every FP8 layer's input range. Then per-row scales (today) and the calibrated ones are each compiled as the app
compiles the model (its repeated blocks) and timed over --runs calls (CUDA events; wall clock on a CPU), and each
one's output on a held-out input is compared with the 16-bit transformer's (relative L2 error). The verdict on the
lever (default on, or dropped) needs this and the image difference in `scripts/gpu_speed_levers.py`.
Writes OUT/fp8_static_scales.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_step import flux_inputs, timed  # noqa: E402  (this folder is on sys.path when a script runs)
from pipelines.backends.contract import TorchOptions  # noqa: E402
from pipelines.backends.torch_backend import TorchBackend, compile_denoiser  # noqa: E402
from pipelines.device_policy import DevicePolicy  # noqa: E402
from pipelines.fp8_static import clear_input_scales, fp8_layers, recording_input_amax, set_input_scales  # noqa: E402
from pipelines.gpu import probe_device  # noqa: E402
from pipelines.loading import WeightSource  # noqa: E402
from pipelines.precision import Precision  # noqa: E402
from pipelines.registry import resolve_spec  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux.1-dev")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--calibration", type=int, default=8, help="transformer calls the ranges are recorded over")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")

    spec = resolve_spec(args.model)
    policy = DevicePolicy.for_info(probe_device(args.device))
    backend = TorchBackend(TorchOptions(compile=False))  # compiled below, after the eager calibration
    load = lambda precision: backend.load(spec, spec.denoiser, Precision.parse(precision), args.device, policy,  # noqa: E731
                                          WeightSource(random_weights=True))
    sixteen = policy.sixteen_bit
    reference_model = load(sixteen.value)
    fp8 = load("fp8")
    dtype = fp8.dtype
    held_out = flux_inputs(spec, args.size, dtype, args.device, seed=1000)
    summary: dict = {"model": spec.id, "size": args.size, "device": torch.cuda.get_device_name() if cuda else "CPU",
                     "torch": torch.__version__, "calibration_calls": args.calibration, "compiled": not args.no_compile,
                     "date": time.strftime("%Y-%m-%d"), "runs_as": fp8.runs_as}
    with torch.inference_mode():
        reference = reference_model.obj(**held_out).float()
        del reference_model
        transformer = fp8.obj.transformer
        with recording_input_amax(transformer) as amax:
            for i in range(args.calibration):
                fp8.obj(**flux_inputs(spec, args.size, dtype, args.device, seed=i + 1,
                                      timestep=(i + 0.5) / args.calibration))
        summary["layers"] = len(fp8_layers(transformer))
        if not args.no_compile:
            compile_denoiser(transformer, spec, None)
        for label, setup in (("per-row scales (today)", clear_input_scales),
                             ("calibrated scales", lambda m: set_input_scales(m, amax))):
            setup(transformer)
            for _ in range(3):  # compile (a new variant: the scales change the traced code) and warm up
                fp8.obj(**held_out)
            step_ms = timed(lambda: fp8.obj(**held_out), args.runs, cuda)
            output = fp8.obj(**held_out).float()
            error = ((output - reference).norm() / reference.norm()).item()
            summary[label] = {"step_ms": round(step_ms, 2), "relative_error_vs_16bit": round(error, 5),
                              "calibrated_layers": sum(layer.input_scale is not None
                                                       for layer in fp8_layers(transformer).values())}
            print(f"{label}: {step_ms:.2f} ms a call, relative error vs {sixteen.value} {error:.5f}", flush=True)
    today, calibrated = summary["per-row scales (today)"], summary["calibrated scales"]
    summary["speedup"] = round(today["step_ms"] / calibrated["step_ms"], 3)
    (out / "fp8_static_scales.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
