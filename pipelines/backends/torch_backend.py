"""PyTorch backend: diffusers/transformers modules with the precision applied and, on a GPU, torch.compile.

Optimisations, in order, each with its off switch and reason:
1. 16-bit weights (bf16 for Flux, fp16 for SDXL), the FP8/FP4 Linear swap on the denoiser only. On a CPU
   without fast 16-bit math the rounded 16-bit weights compute in FP32 (DevicePolicy, cpu_math.py).
2. torch.compile of the denoiser, on by default on CUDA GPUs (`--no-compile`), behind CompiledEngine: a
   "compile" progress stage per new input size, and eager (with the reason) if compiling fails, scoped per family (`compile_whole_denoiser` in pipelines/families/):
   Flux compiles its repeated blocks only (diffusers `compile_repeated_blocks`, PR #11705: the
   whole-model speed at a fraction of the compile time; H100: 183 -> 132 ms/step bf16); SDXL compiles
   the whole UNet, because its blocks-only compile left the launch-bound ResNet/conv part eager and gained
   nothing (H200, fp16 1024x1024: 59.8 ms/step eager, 60.8 blocks only, 43.4 whole UNet; BENCHMARKS.md).
3. CUDA graphs for the compiled denoiser, OFF by default (`--torch-cuda-graphs`): torch.compile's
   "reduce-overhead" mode records each compiled graph once per input size and replays it. Measured in the app's
   own path (H200, 2026-12-01, scripts/gpu_speed_levers.py): Flux.1-dev FP8 105.9 vs 106.3 ms/step (its ~6 ms of
   launch gaps are not what the regional graphs remove), and for SDXL inductor's CUDA-graph trees assert in the
   manager's worker thread (`torch._C._is_key_in_tls`), so the job fell back to eager (63 ms/step). With the
   wrapper giving the calling thread that state (`adopt_cuda_graph_state`, compile_guard.py) the graphs ran
   (H100, 2026-12-07): SDXL fp16 36.0 vs 36.2 ms/step compiled, no gain worth the memory pool. On a CPU
   inductor skips the graphs by itself, so the lever is labelled "not available" there and changes nothing.
4. SDXL's VAE in bf16 rather than fp32, OFF by default (`--bf16-vae`): the fp16 SDXL VAE overflows (NaN), which
   bf16's range does not; fp32 costs 117 ms, bf16 87 ms of a 1.24 s image on the H200. On random weights the
   bf16 image differs visibly (24.1 dB PSNR / SSIM 0.913 against fp32): not turned on until real weights show
   the difference small. DevicePolicy.bf16_vae decides it.
5. FP8 attention for FLUX.1 at FP8, OFF by default (`--fp8-attention`): cuDNN's FP8 flash attention through
   nvidia-cudnn-frontend (pipelines/fp8_attention.py), on Hopper and Blackwell where a probe plan builds and
   agrees with float32 attention; elsewhere the lever says why it is not available. A CPU runs the kernel's
   arithmetic emulated (labelled), so the demo models show what it does to images. Measured (H100, 2026-12-07):
   Flux.1-dev FP8 109.6 -> 107.2 ms a step; demo-flux 45.0 -> 41.8 dB against bf16: not worth it by default.
   (torch's own FP8 attention is the experimental FA3 path, which needs a separately built FA3 module.)
6. SDXL's attention projections fused at 16 bits, ON by default on CUDA GPUs (`--no-fused-qkv`), off on a CPU
   where it was not measured: one GEMM for Q, K, V (pipelines/families/sdxl_attention.py; H100, 2026-12-07:
   38.8 -> 37.1 and 44.7 -> 40.2 ms a compiled UNet step alone, two machines, outputs equal to 0.1%). Not at
   FP8/FP4, where the Linear layers are ours. In the app's own path the fused row measured slower (48.2 vs 38.8
   ms), but it ran first in both calls, as the slow row did in every call that day: under re-measurement with
   the order controlled (scripts/gpu_speed_levers.py runs "without" before and after it).
7. The VAE decoder compiled too, OFF by default (`--compile-vae`; needs torch.compile): 125 -> 71 ms an SDXL
   decode (fp32) and 92 -> 39 ms a FLUX.1 decode (bf16) at 1024x1024 on an H100 (scripts/gpu_vae_levers.py), but
   ~30 s more before the first image at each new size with a cold cache and 2-3 s after each restart: for 50 ms
   an image that is a trade the user chooses. cuDNN's algorithm search (cudnn.benchmark) and channels-last
   memory gave nothing or lost (SDXL 125 -> 125 and 182 ms eager) and are not wired.
Measured and not wired in (BENCHMARKS.md, 2026-12-07): calibrated FP8 activation scales (1.05x a Flux step;
`pipelines/fp8_static.py` says why not) and channels-last UNet memory (1%, within the noise between calls).
"""
from __future__ import annotations

import os

import torch

from ..components import LoadedComponent, estimate_bytes, largest_linear_bytes
from ..device_policy import DevicePolicy
from ..families import family_of
from ..families.family import VAE_ENCODER, weights_of
from ..fp8_attention import fp8_attention_label, fp8_attention_problem
from ..graphs import VAE_DECODER
from ..loading import WeightSource, cast, load_component
from ..lora import NO_LORAS, LoraError, LoraSet
from ..precision import Backend, Precision, SupportLevel
from ..quant import module_bytes, quantize_linears
from ..registry import ModelSpec
from ..run_context import RunContext
from .compile_guard import CompiledEngine
from .contract import TorchOptions
from .torchao_peer import quantize_peer
from .torch_lora import LoraState

# The ComponentKey.lora of a quantized denoiser that kept its 16-bit base to take LoRAs (any set).
LORA_READY = "16-bit base kept"


class TorchBackend:
    name = Backend.TORCH.value

    def __init__(self, options: TorchOptions = TorchOptions()):
        self.options = options
        if options.compile and options.compile_cache_dir is not None:
            # Inductor reads its cache folder from this variable only (and writes it back itself), so it is
            # set once, here, when the manager builds its backend; a folder the user set is left alone.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(options.compile_cache_dir))

    def describe(self) -> str:
        if not self.options.compile:
            return "PyTorch (eager)"
        return "PyTorch + torch.compile" + (" + CUDA graphs" if self.options.cuda_graphs else "")

    def _staged(self, spec: ModelSpec, name: str, precision: Precision, device: str, source: WeightSource) -> bool:
        return (self.options.stage_on_host and device.startswith("cuda") and name == spec.denoiser
                and not Precision.parse(precision).is_16bit and not source.random_weights)

    def load_peak_bytes(self, spec: ModelSpec, name: str, precision: Precision, device: str, policy: DevicePolicy,
                        source: WeightSource = WeightSource()) -> int:
        """Device memory at the height of loading. A quantized denoiser is converted from 16-bit weights:
        staged in host RAM it costs its final size plus one 16-bit layer; built in place, its 16-bit size."""
        final = estimate_bytes(spec, name, precision, policy)
        if name != spec.denoiser or Precision.parse(precision).is_16bit:
            return final
        if self._staged(spec, name, precision, device, source):
            return final + largest_linear_bytes(spec, name)
        return estimate_bytes(spec, name, policy.sixteen_bit, policy)

    def lora_variant(self, spec: ModelSpec, name: str, precision: Precision, loras: LoraSet) -> str:
        """Only a quantized denoiser loads differently for LoRAs (it keeps its 16-bit base); every other
        form takes any LoRA set in place, so one loaded module serves every set."""
        quantized = name == spec.denoiser and not Precision.parse(precision).is_16bit
        return LORA_READY if quantized and loras.touches(name) else ""

    def apply_loras(self, spec: ModelSpec, name: str, component: LoadedComponent, loras: LoraSet) -> None:
        """Fuse `loras` into the loaded component (unfusing the previous set); all or nothing."""
        if component.lora is None:
            if loras.touches(name):
                raise LoraError(f"{spec.id} {name} was loaded without LoRA support; this is a bug, please report it.")
            return
        component.lora.apply(loras.layers(name), loras.key(name), ", ".join(a.file.name for a in loras.items))

    def fp8_attention_problem(self, spec: ModelSpec, precision: Precision, device: str) -> str | None:
        """Why `spec`'s denoiser at `precision` does not get FP8 attention here (None: it does)."""
        if not self.options.fp8_attention:
            return "off (--fp8-attention turns it on)"
        if Precision.parse(precision) is not Precision.FP8 or family_of(spec).fp8_attention is None:
            return "FLUX.1 at FP8 only"
        return fp8_attention_problem(device)

    def fuses_qkv(self, spec: ModelSpec, device: str) -> bool:
        """Whether `spec`'s 16-bit denoiser gets its attention projections fused here."""
        return fused_qkv_on(self.options, device.startswith("cuda")) and family_of(spec).fuse_qkv is not None

    def load(self, spec: ModelSpec, name: str, precision: Precision, device: str, policy: DevicePolicy,
             source: WeightSource, ctx: RunContext | None = None, loras: LoraSet = NO_LORAS) -> LoadedComponent:
        dtype = policy.component_dtype(spec, name, precision)
        weights = policy.weight_dtype(spec, name, precision)
        staged = self._staged(spec, name, precision, device, source)
        obj = load_component(spec, weights_of(name), dtype=weights or torch.float32, device="cpu" if staged else device,
                             source=source)
        if name == VAE_ENCODER:
            obj.decoder = None  # the encoder alone: the decoder is the "vae" component
        if dtype is None:  # tokenizer or scheduler
            return LoadedComponent(obj, 0, None)
        if dtype != weights:  # a CPU without fast 16-bit math: the rounded 16-bit weights compute in FP32
            cast(obj, dtype)

        runs_as = None
        quantized = name == spec.denoiser and not Precision.parse(precision).is_16bit
        lora = None
        if name in family_of(spec).lora_components and (not quantized or self.lora_variant(spec, name, precision, loras)):
            lora = LoraState(obj)
        if name == spec.denoiser:
            support = policy.support(precision, Backend.TORCH)
            native_fp4 = Precision.parse(precision) is Precision.FP4 and support.level is SupportLevel.NATIVE
            report = _quantize(obj, spec, precision, dtype, native_fp4, device if staged else None,
                               lora.base if lora is not None and quantized else None)
            runs_as = support.runs_as if report.native_fp4 == native_fp4 else "FP4 weights, 16-bit compute"
        if name == spec.denoiser and not quantized and self.fuses_qkv(spec, device):
            family_of(spec).fuse_qkv(obj)
        if name == spec.denoiser and self.fp8_attention_problem(spec, precision, device) is None:
            family_of(spec).fp8_attention(obj)
            runs_as = f"{runs_as} + {fp8_attention_label(device)}"
        peer = name == spec.denoiser and self.options.peer is not None
        if peer:
            runs_as = quantize_peer(obj, self.options.peer, policy.capability)
        engine = family_of(spec).adapter(name)(obj).eval()
        if name == spec.denoiser and self.options.compile:
            mode = compile_mode(self.options, device)
            engine = CompiledEngine(engine, lambda: compile_denoiser(obj, spec, mode, whole=peer),
                                    cuda_graphs=mode == REDUCE_OVERHEAD)
        elif name == VAE_DECODER and self.options.compile and self.options.compile_vae:
            engine = CompiledEngine(engine, engine.compile, part="VAE decoder", first_call="the decode")
        return LoadedComponent(engine, module_bytes(obj), dtype, runs_as, lora)

REDUCE_OVERHEAD = "reduce-overhead"  # torch.compile's mode that records and replays CUDA graphs


def lever_states(options: TorchOptions, cuda: bool) -> dict[str, str]:
    """Each speed lever as the user set it and whether it acts on this device (bench rows, the report)."""
    def state(on: bool, flag: str, missing: str | None) -> str:
        if not on:
            return f"off ({flag})"
        return f"not available: {missing}" if missing else "on"

    compiled = options.compile if options.compile is not None else cuda
    no_gpu = None if cuda else "no CUDA GPU"
    return {"torch.compile": state(compiled, "--no-compile", None),
            "CUDA graphs": state(options.cuda_graphs, "--torch-cuda-graphs turns it on",
                                 no_gpu or (None if compiled else "needs torch.compile")),
            "SDXL VAE in bf16": state(options.bf16_vae, "--bf16-vae turns it on", no_gpu),
            "FP8 attention (FLUX.1 at FP8)": fp8_attention_state(options, cuda),
            "fused QKV projections (SDXL at 16 bits)": fused_qkv_state(options, cuda),
            "VAE decoder compiled": state(options.compile_vae, "--compile-vae turns it on",
                                          None if compiled else "needs torch.compile")}


def fused_qkv_on(options: TorchOptions, cuda: bool) -> bool:
    """SDXL's fused projections: as the user set them, else on CUDA GPUs only (where they were measured)."""
    return options.fused_qkv if options.fused_qkv is not None else cuda


def fused_qkv_state(options: TorchOptions, cuda: bool) -> str:
    if fused_qkv_on(options, cuda):
        return "on"
    return "off (--no-fused-qkv)" if options.fused_qkv is False else "off (measured on GPUs only)"


def fp8_attention_state(options: TorchOptions, cuda: bool) -> str:
    if not options.fp8_attention:
        return "off (--fp8-attention turns it on)"
    if not cuda:
        return "on (CPU emulation: the image difference, not the speed)"
    problem = fp8_attention_problem("cuda")
    return f"not available: {problem}" if problem else "on"


def compile_mode(options: TorchOptions, device: str) -> str | None:
    """The torch.compile mode: the one asked for, else CUDA graphs on a CUDA device unless switched off."""
    if options.compile_mode is not None:
        return options.compile_mode
    return REDUCE_OVERHEAD if options.cuda_graphs and device.startswith("cuda") else None


def compile_denoiser(module: torch.nn.Module, spec: ModelSpec, mode: str | None, whole: bool = False) -> None:
    """Mark the denoiser for torch.compile in place (compilation itself happens on the first call); `whole`
    compiles the whole module whatever the family's scope (the torchao peer's recipe)."""
    if whole or family_of(spec).compile_whole_denoiser:
        module.compile(mode=mode)  # graph breaks allowed: diffusers' UNet has a few data-dependent branches
    else:
        module.compile_repeated_blocks(fullgraph=True, mode=mode)


def _quantize(module: torch.nn.Module, spec: ModelSpec, precision: Precision, dtype: torch.dtype, native_fp4: bool,
              device: str | None, bases: dict[str, torch.Tensor] | None):
    keep = family_of(spec).keep_16bit
    if native_fp4 and native_fp4_available() and bases is None:
        return quantize_linears(module, precision, keep, dtype, native_fp4=True, device=device)
    # Without torchao's NVFP4 kernels the honest fallback is FP4 weights with 16-bit compute; with LoRAs too,
    # since torchao's NVFP4 tensors cannot be re-quantized in place (torch_lora rebuilds our own layers).
    return quantize_linears(module, precision, keep, dtype, native_fp4=False, device=device, bases=bases)


def native_fp4_available() -> bool:
    try:
        from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig  # noqa: F401
    except Exception:
        return False
    return True
