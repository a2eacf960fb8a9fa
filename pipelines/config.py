"""One path from command-line flags to a `ManagerConfig`, shared by `python -m pipelines` (generate, bench,
build, cache) and `python app.py`, so a flag means the same everywhere and is declared once.

The environment is read here only, at the boundary: PRISM_ENGINE_CACHE as the --engine-cache default.
Light to import (torch comes in only when a configuration is built), so argument errors answer at once.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .backends.contract import TensorRTOptions, TorchOptions
from .engine_cache import DEFAULT_CACHE_DIR, ENV_VAR
from .prompt_cache import DEFAULT_ENTRIES

DEFAULT_LORA_DIR = Path("loras")  # pipelines.lora reads it from here: this module stays light to import

if TYPE_CHECKING:
    from .loading import HubOptions
    from .manager import ManagerConfig


class FlagError(ValueError):
    """A runtime flag's value cannot be used; the message names the flag and what to write instead."""


def default_engine_cache() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()


def add_hub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub (like HF_HUB_OFFLINE=1)")
    p.add_argument("--hf-token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")


def add_engine_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine-cache", type=Path, default=None, metavar="DIR",
                   help=f"folder for built engines and compiled kernels (default: {ENV_VAR} or engine_cache/)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The flags that configure the manager: device, backend and its options, memory, weights, caches."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "tensorrt"],
                   help="auto picks TensorRT where it is installed and runs on this GPU, else PyTorch")
    p.add_argument("--memory-budget", default=None, help="memory Prism may use, e.g. 40GB or 0.6 of the device")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="PyTorch backend: torch.compile the denoiser (default: on CUDA GPUs, off on a CPU; "
                        "--no-compile turns it off). The first image per model, precision and size compiles once "
                        "(seconds to minutes, kept in the engine cache); later ones run up to 1.7x faster")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="TensorRT backend: run the denoiser engine without CUDA graph replay")
    p.add_argument("--torch-cuda-graphs", action="store_true",
                   help="PyTorch backend: replay the compiled denoiser as CUDA graphs (torch.compile reduce-overhead). "
                        "Off by default: no faster for Flux FP8 on an H200 and failing for SDXL in the app's worker "
                        "thread (BENCHMARKS.md, 2026-12-01)")
    p.add_argument("--bf16-vae", action="store_true",
                   help="PyTorch backend: run SDXL's VAE in bf16 instead of fp32 on GPUs with bf16 (30 ms less per "
                        "image on an H200; off by default until its image difference is shown small on real weights)")
    p.add_argument("--fp8-attention", action="store_true",
                   help="PyTorch backend: at FP8, FLUX.1's attention runs in FP8 too (cuDNN's kernel; needs "
                        "nvidia-cudnn-frontend and a Hopper or Blackwell GPU; a CPU emulates it). Off by default: "
                        "2%% faster a step on an H100, 3 dB more image difference on demo-flux (BENCHMARKS.md)")
    p.add_argument("--no-fused-qkv", action="store_true",
                   help="PyTorch backend: keep SDXL's attention projections as three GEMMs (fused by default on "
                        "CUDA GPUs at 16 bits: 5-10%% faster a compiled UNet step on an H100)")
    p.add_argument("--compile-vae", action="store_true",
                   help="PyTorch backend, with torch.compile: compile the VAE decoder too (50 ms less per 1024x1024 "
                        "image on an H100; off by default: about 30 s more before the first image at each new size)")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="encode every job's prompt (by default the encodings of the last 32 prompts are kept, so a "
                        "new seed, size or precision with the same prompt skips the text encoders)")
    p.add_argument("--no-run-ahead", action="store_true",
                   help="wait for each denoising step to finish on the GPU before queuing the next (by default the "
                        "host queues the next step while the GPU runs one, and progress is reported a step later)")
    p.add_argument("--weight-streaming-budget", default=None, metavar="SIZE",
                   help="TensorRT backend: keep at most this much of each engine's weights on the GPU (e.g. 8GB) and "
                        "stream the rest from host memory; engines are then built streamable")
    p.add_argument("--random-weights", action="store_true",
                   help="Hub models get their exact architecture with random weights (benchmarks, or trying the app "
                        "without downloading; pictures are noise)")
    p.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                   help="folder of LoRA .safetensors files offered by name (default: loras/)")
    add_hub_args(p)
    add_engine_cache_arg(p)


def hub_options(args: argparse.Namespace) -> "HubOptions":
    from .loading import HubOptions

    return HubOptions(token=args.hf_token, offline=True if args.offline else None)


def engine_cache_dir(args: argparse.Namespace) -> Path:
    return args.engine_cache or default_engine_cache()


def _size(flag: str, text: str) -> int:
    from .gpu import parse_memory

    try:
        size = parse_memory(text, 0)
    except ValueError:
        size = 0
    if size <= 0:
        raise FlagError(f"{flag} {text!r} is not a size; write e.g. 8GB or 512MB.")
    return size


def manager_config(args: argparse.Namespace, **overrides) -> "ManagerConfig":
    """The manager configuration the runtime flags describe (`overrides` for a command's own choices)."""
    from .manager import ManagerConfig

    streaming = args.weight_streaming_budget
    config = ManagerConfig(
        device=args.device, backend=args.backend, memory_budget=args.memory_budget,
        random_weights=args.random_weights, hub=hub_options(args), engine_cache_dir=engine_cache_dir(args),
        torch=TorchOptions(compile=args.compile, cuda_graphs=args.torch_cuda_graphs, bf16_vae=args.bf16_vae,
                           fp8_attention=args.fp8_attention, fused_qkv=False if args.no_fused_qkv else None,
                           compile_vae=args.compile_vae),
        lora_dir=args.lora_dir or DEFAULT_LORA_DIR,
        prompt_cache_entries=0 if args.no_prompt_cache else DEFAULT_ENTRIES,
        steps_ahead=0 if args.no_run_ahead else 1,
        tensorrt=TensorRTOptions(cuda_graphs=not args.no_cuda_graphs,
                                 weight_streaming_budget=_size("--weight-streaming-budget", streaming) if streaming else None))
    return replace(config, **overrides)
