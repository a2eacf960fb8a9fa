"""Issue 17: the VAE decoders' share of an image (SDXL base fp32: ~120 ms of a 1.23 s image; FLUX.1 bf16: ~90
ms of 3.1 s) and what cuDNN's algorithm search, channels-last memory and torch.compile take off it, measured on
the decoder alone at 1024x1024 with random full-size weights through the app's loader (nothing downloaded).

    python3 scripts/gpu_vae_levers.py --out $OUT                     # on the lent GPU
    python3 scripts/gpu_vae_levers.py --device cpu --models demo-sdxl --size 64 --runs 2 --out /tmp/v   # smoke run

Each model's decoder runs in the dtype the app gives it there; every variant's output is compared with the
eager one (relative L2 error: all are the same arithmetic up to rounding order and algorithm choice).
Writes OUT/vae_levers.json; rows are printed as they finish (a variant past --budget seconds is skipped).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_step import timed  # noqa: E402
from pipelines.device_policy import DevicePolicy  # noqa: E402
from pipelines.gpu import probe_device  # noqa: E402
from pipelines.graphs import VaeDecoder  # noqa: E402
from pipelines.loading import WeightSource, load_component  # noqa: E402
from pipelines.registry import resolve_spec  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (label, cudnn algorithm search, channels-last, torch.compile)
VARIANTS = [("today: eager", False, False, False),
            ("eager + cudnn.benchmark", True, False, False),
            ("eager + channels-last + cudnn.benchmark", True, True, False),
            ("compile", False, False, True),
            ("compile + cudnn.benchmark", True, False, True)]


def psnr_db(image: torch.Tensor, reference: torch.Tensor) -> float | None:
    """PSNR of two decoded images as the app writes them (8 bits a channel); None when they are the same."""
    to_8bit = lambda x: ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round()  # noqa: E731
    mse = (to_8bit(image) - to_8bit(reference)).pow(2).mean().item()
    return None if mse == 0 else round(10 * math.log10(255 ** 2 / mse), 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["sdxl-base-1.0", "flux.1-dev"])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--budget", type=float, default=300, help="seconds; a variant that would start later is skipped")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="the decoder's dtype (default: the app's on this device; bf16 on a CPU shows what compiling "
                        "does to a trained bf16 decoder's image, e.g. demo-flux's)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    policy = DevicePolicy.for_info(probe_device(args.device))
    summary: dict = {"size": args.size, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                     "device": torch.cuda.get_device_name() if cuda else "CPU", "rows": []}
    for model in args.models:
        spec = resolve_spec(model)
        app_dtype = policy.component_dtype(spec, "vae", policy.reference_precision(spec))
        dtype = DTYPES[args.dtype] if args.dtype else app_dtype
        vae = load_component(spec, "vae", dtype=dtype, device=args.device, source=WeightSource(random_weights=True))
        decoder = VaeDecoder(vae).eval()
        cfg = spec.components["vae"].config
        latent = args.size // spec.vae_scale_factor
        latents = torch.randn(1, cfg["latent_channels"], latent, latent, device=args.device, dtype=dtype,
                              generator=torch.Generator(args.device).manual_seed(0))
        reference = None
        with torch.inference_mode():
            for label, search, channels_last, compiled in VARIANTS:
                if time.monotonic() - started > args.budget:
                    summary["rows"].append({"model": spec.id, "variant": label, "skipped": "past --budget"})
                    continue
                torch._dynamo.reset()
                vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                run = torch.compile(decoder) if compiled else decoder
                flags = dict(enabled=True, benchmark=search, deterministic=False,
                             allow_tf32=torch.backends.cudnn.allow_tf32)
                with torch.backends.cudnn.flags(**flags):
                    t0 = time.monotonic()
                    run(latents)  # compiles (or searches algorithms) here
                    first_s = time.monotonic() - t0
                    run(latents)
                    ms = timed(lambda: run(latents), args.runs, cuda)
                    output = run(latents).float()
                if reference is None:
                    reference = output
                error = ((output - reference).norm() / reference.norm()).item()
                row = {"model": spec.id, "dtype": str(dtype), "variant": label, "decode_ms": round(ms, 2),
                       "first_call_s": round(first_s, 1), "relative_error_vs_eager": round(error, 6),
                       "psnr_db_vs_eager": psnr_db(output, reference)}
                summary["rows"].append(row)
                print(json.dumps(row), flush=True)
                (out / "vae_levers.json").write_text(json.dumps(summary, indent=2) + "\n")
        del vae, decoder
        if cuda:
            torch.cuda.empty_cache()
    (out / "vae_levers.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
