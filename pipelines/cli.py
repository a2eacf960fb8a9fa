"""`python -m pipelines generate|bench|build|cache|doctor|serve|models`: the same manager the web app uses, headless."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import add_engine_cache_arg, add_hub_args, add_runtime_args
from .errors import user_message
from .log_setup import configure_logging, drop_import_notices
from .precision import Precision

log = logging.getLogger("prism.cli")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    add_runtime_args(p)
    p.add_argument("-v", "--verbose", action="store_true")


def _add_request_args(p: argparse.ArgumentParser, multi_precision: bool = False) -> None:
    p.add_argument("--model", default=None, nargs="+" if multi_precision else None,
                   help="registry id (flux.1-dev, flux.1-schnell, flux.1-kontext-dev, sdxl-base-1.0, sdxl-turbo, "
                        "demo-flux, demo-sdxl, demo-kontext) "
                        "or a local folder in the Hugging Face pipeline layout (default: the best model available here)"
                        + ("; several run one after another" if multi_precision else ""))
    choices = [p_.value for p_ in Precision]
    if multi_precision:
        p.add_argument("--precision", nargs="+", default=None, choices=choices,
                       help="default: bf16 (with --suite: each model's 16-bit type, fp8 and fp4)")
    else:
        p.add_argument("--precision", default="bf16", choices=choices)
    p.add_argument("--width", type=int, default=None,
                   help="default: the model's; with --image, the image's shape at about the model's pixel count")
    p.add_argument("--height", type=int, default=None, help="default: as --width")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="default: random (reported)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--sampler", default="", help="e.g. 'DPM++ 2M Karras' (SDXL) or 'Euler Karras' (Flux); "
                                                  "default: the model's own scheduler")
    p.add_argument("--image", default=None, help="input image for image to image (fitted to the size: scaled to "
                                                 "cover it, centre cropped), or the image an edit model "
                                                 "(flux.1-kontext-dev, demo-kontext) changes as the prompt says")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: how much to repaint, above 0 up to 1 (default 0.6)")
    p.add_argument("--mask", default=None, help="with --image: inpaint where this mask is white (same size as the image)")
    p.add_argument("--mask-blur", type=int, default=4, help="with --mask: pixels of blur where the result is pasted back")
    p.add_argument("--only-masked", action="store_true",
                   help="with --mask: repaint only the region around the mask, at the full --width x --height")
    p.add_argument("--cache", default="off", choices=["off", "fast"],
                   help="step caching: fast reuses the model's output on some middle steps (28 Flux steps run the "
                        "model 17 times; the image changes a little: see BENCHMARKS.md). Default: off. With bench: adds a "
                        "cached row after each precision")
    p.add_argument("--refiner", type=float, default=None, metavar="SWITCH",
                   help="SDXL base: hand the last steps to its refiner (sdxl-refiner-1.0) after this fraction of "
                        "them, above 0 and below 1 (0.8 is usual); off by default")
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_NAME[:SCALE]",
                   help="a LoRA by file path or by name in --lora-dir, with its scale (default 1); repeatable. "
                        "<lora:NAME:SCALE> in the prompt works too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description="Prism: Flux.1 and SDXL, headless.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="render images for a prompt")
    gen.add_argument("prompt")
    _add_request_args(gen)
    gen.add_argument("--out", default="outputs/prism.png", help="PNG path; several images get -1, -2, ... suffixes")
    _add_runtime_args(gen)

    bench = sub.add_parser("bench", help="per-stage timings with a same-run diffusers baseline")
    bench.add_argument("prompt", nargs="?", default="a photo of a red fox in a snowy forest, golden hour")
    _add_request_args(bench, multi_precision=True)
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--no-baseline", action="store_true", help="skip the plain diffusers eager baseline")
    bench.add_argument("--suite", action="store_true",
                       help="every Hub model: flux.1-dev, flux.1-schnell, sdxl-base-1.0, sdxl-turbo")
    bench.add_argument("--peer", default=None, choices=["torchao"],
                       help="add the published recipe as a row: torchao FP8 dynamic per-row + torch.compile of the "
                            "whole denoiser (needs torchao and a GPU with FP8, compute capability 8.9+)")
    bench.add_argument("--json-out", default=None, help="also write the results as JSON")
    _add_runtime_args(bench)
    # Each run encodes its prompt: the text stage's figure is what a new prompt costs, not a remembered one's.
    bench.set_defaults(no_prompt_cache=True)

    build = sub.add_parser("build", help="export, quantize and build TensorRT engines into the engine cache")
    build.add_argument("--model", required=True)
    build.add_argument("--precision", default="bf16", choices=[p_.value for p_ in Precision])
    build.add_argument("--backend", default="tensorrt", choices=["tensorrt"])
    build.add_argument("--target", default="current", help="sm89, sm120, sm121 or current (the GPU here)")
    build.add_argument("--width", type=int, default=None)
    build.add_argument("--height", type=int, default=None)
    build.add_argument("--min-size", type=int, default=None, help="smallest side of a dynamic size range")
    build.add_argument("--max-size", type=int, default=None, help="largest side of a dynamic size range")
    build.add_argument("--max-batch", type=int, default=1)
    build.add_argument("--components", nargs="+", default=None, help="default: every component")
    build.add_argument("--random-weights", action="store_true")
    build.add_argument("--onnx-source", default="export", choices=["export", "official"],
                       help="official: the model maker's ONNX for the denoiser (e.g. FLUX.1-dev-onnx; needs a token)")
    build.add_argument("--calibration-prompts", type=int, default=None, help="FP8/FP4: calibration images (default 32)")
    build.add_argument("--calibration-steps", type=int, default=None, help="FP8/FP4: steps per image (default: the model's)")
    build.add_argument("--weight-streaming", action="store_true",
                       help="build engines that can stream weights from host memory (low-memory GPUs)")
    add_hub_args(build)
    add_engine_cache_arg(build)
    build.add_argument("-v", "--verbose", action="store_true")

    cache = sub.add_parser("cache", help="list, clear or prune the engine cache")
    cache.add_argument("action", choices=["list", "clear", "prune"])
    cache.add_argument("--max-size", default=None, help="with prune: e.g. 50GB")
    add_engine_cache_arg(cache)
    cache.add_argument("--dir", dest="engine_cache", type=Path, default=None, help=argparse.SUPPRESS)  # older name
    cache.add_argument("-v", "--verbose", action="store_true")

    doctor = sub.add_parser("doctor", help="check what works on this machine (GPU, TensorRT, every precision) in ~2 min")
    doctor.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    doctor.add_argument("--json-out", default="prism-doctor.json", help="where to write the report (attach it to bug reports)")
    doctor.add_argument("--budget", type=float, default=120.0, help="seconds; rows not reached by then say 'not run'")
    doctor.add_argument("-v", "--verbose", action="store_true")

    serve = sub.add_parser("serve", help="deploy on a Ray cluster, one replica per GPU, and report its replicas; "
                                          "--bench measures images per minute (pip install -r requirements-ray.txt)")
    serve.add_argument("--address", default=None,
                       help="Ray cluster to join (HOST:6379); default: the one `ray start` made here, else a new one")
    serve.add_argument("--replicas", type=int, default=None, help="default: one per GPU in the cluster")
    serve.add_argument("--max-queue", type=int, default=None, help="jobs that may wait (default 4; --bench: --requests)")
    serve.add_argument("--bench", action="store_true", help="time --requests concurrent jobs, then exit")
    serve.add_argument("--requests", type=int, default=8, help="with --bench: concurrent jobs (default 8)")
    serve.add_argument("--prompt", default="a photo of a red fox in a snowy forest, golden hour")
    serve.add_argument("--json-out", default=None, help="with --bench: also write the figures as JSON")
    _add_request_args(serve)
    _add_runtime_args(serve)

    models = sub.add_parser("models", help="list the models Prism knows and whether their weights are here")
    models.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    drop_import_notices()
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.command == "generate":
            from .commands import run_generate
            return run_generate(args)
        if args.command == "bench":
            from .bench import run_bench
            return run_bench(args)
        if args.command == "build":
            from .backends.tensorrt.cli import run_build
            return run_build(args)
        if args.command == "doctor":
            from .commands import run_doctor_command
            return run_doctor_command(args)
        if args.command == "cache":
            from .commands import run_cache
            return run_cache(args)
        if args.command == "serve":
            from .serving.commands import run_serve
            return run_serve(args)
        from .commands import run_models
        return run_models(args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure the user can fix ends in one readable line
        if args.verbose or not user_message(exc, fallback=False):
            log.exception("failed")
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
