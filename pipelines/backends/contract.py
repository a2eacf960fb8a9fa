"""What every backend offers (`ComponentBackend`) and the options each is built with.

The manager talks to backends only through this contract: every method takes the same device facts
(a `DevicePolicy`), and the manager alone names what it loaded (`ComponentKey`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..components import LoadedComponent
    from ..device_policy import DevicePolicy
    from ..loading import WeightSource
    from ..lora import LoraSet
    from ..precision import Precision
    from ..registry import ModelSpec
    from ..run_context import RunContext

CALIBRATION_PROMPTS = 32  # FP8/FP4 calibration images (one prompt each)


class TensorRTFailure(RuntimeError):
    """Building, loading or running an engine failed. The manager reruns the job on PyTorch and remembers the
    engine, so later jobs do not rebuild it in a loop."""

    def __init__(self, model: str, component: str, precision: str, stage: str, reason: str):
        super().__init__(f"TensorRT {stage} of {model} {component} ({precision}) failed: {reason}")
        self.model, self.component, self.precision, self.stage, self.reason = model, component, precision, stage, reason

    @property
    def engine(self) -> tuple[str, str]:
        """What is remembered as failing: the model and precision (one failing engine stops the pipeline)."""
        return self.model, self.precision


class ComponentBackend(Protocol):
    name: str  # precision.Backend value

    def describe(self) -> str:
        """What runs, for results and the System tab (e.g. "PyTorch + torch.compile")."""

    def load(self, spec: "ModelSpec", name: str, precision: "Precision", device: str, policy: "DevicePolicy",
             source: "WeightSource", ctx: "RunContext | None" = None, loras: "LoraSet" = ...) -> "LoadedComponent":
        """Component `name` on `device`: an engine taking the keyword arguments of its `pipelines.graphs` module,
        made to take `loras` (built with them fused, or able to fuse them in `apply_loras`)."""

    def lora_variant(self, spec: "ModelSpec", name: str, precision: "Precision", loras: "LoraSet") -> str:
        """The ComponentKey.lora of the form `load` gives for `loras` ("" when the plain form takes them)."""

    def apply_loras(self, spec: "ModelSpec", name: str, component: "LoadedComponent", loras: "LoraSet") -> None:
        """Make a loaded component run with exactly `loras` (all or nothing); a no-op where the key holds them."""

    def load_peak_bytes(self, spec: "ModelSpec", name: str, precision: "Precision", device: str,
                        policy: "DevicePolicy", source: "WeightSource") -> int:
        """Device memory at the height of `load` (before loading anything)."""


@dataclass(frozen=True)
class TorchOptions:
    compile: bool | None = None  # torch.compile of the denoiser, scoped per family; None: on CUDA GPUs only
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"; None: see cuda_graphs
    # Speed levers measured and left off by default (--torch-cuda-graphs, --bf16-vae turn them on); see torch_backend.py.
    cuda_graphs: bool = False  # compiled denoiser replays CUDA graphs (torch.compile mode "reduce-overhead")
    bf16_vae: bool = False  # SDXL's VAE runs in bf16 where fp16 would overflow (instead of fp32), on bf16 GPUs
    # FLUX.1 at FP8: attention in FP8 too (cuDNN's kernel through nvidia-cudnn-frontend; pipelines/fp8_attention.py);
    # off: 2% a step on an H100 for 3 dB more image difference on demo-flux (torch_backend.py)
    fp8_attention: bool = False
    # SDXL at 16 bits: one GEMM for each attention's Q, K, V (pipelines/families/sdxl_attention.py); None: on CUDA
    # GPUs, where it was measured (5% of a step), and off on a CPU, where it was not
    fused_qkv: bool | None = None
    # The VAE decoder compiled too (with `compile`), OFF by default: 125 -> 71 ms (SDXL, fp32) and 92 -> 39 ms
    # (FLUX.1, bf16) a 1024x1024 decode on an H100, but ~30 s more before the first image at each new size
    # (cold cache) and ~2-3 s after each restart (warm); scripts/gpu_vae_levers.py, BENCHMARKS.md 2026-12-07
    compile_vae: bool = False
    peer: str | None = None  # bench only: "torchao" runs the published recipe on a 16-bit denoiser (torchao_peer.py)
    # Quantize checkpoints while moving them from host RAM, one layer at a time (discrete GPUs only: on
    # unified memory the host copy is device memory too, so staging saves nothing).
    stage_on_host: bool = False
    # Inductor's compiled kernels and graphs are kept here (under engine_cache/), so a restart reuses them
    # instead of compiling for minutes again; None leaves torch's default (a temp folder).
    compile_cache_dir: Path | None = None


@dataclass(frozen=True)
class TensorRTOptions:
    """How engines are built when the app needs one; `python -m pipelines build` has the same defaults."""

    width: int | None = None  # a static size when given without a range (python -m pipelines build)
    height: int | None = None
    min_size: int | None = None  # None: the model's size limits (engines accept any valid size)
    max_size: int | None = None
    max_batch: int = 1  # larger batches run in chunks of this size
    cuda_graphs: bool = True  # denoiser only: the one engine called many times with the same shapes
    weight_streaming_budget: int | None = None  # bytes of weights kept on the GPU; None: all of them
    onnx_source: str = "export"  # "export" | "official" (the model maker's ONNX, for the denoiser)
    calibration_prompts: int = CALIBRATION_PROMPTS
    calibration_steps: int | None = None  # None: the model's default steps
