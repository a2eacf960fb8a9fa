"""TensorRT backend: `load()` returns an engine with the same call signature as the torch module it replaces.

LoRAs: an engine per LoRA set, built with the set fused into the weights before export, keyed by the
set's digest (files and scales) in the EngineKey's weights revision. Why a rebuild rather than a refit:
for FP8/FP4 the calibrated activation ranges and the weight scales depend on the fused weights, so a
refit would need a re-calibration anyway (ModelOpt calibrates the fused model); one path for every
precision is simple and correct. The cost is a build per new set (minutes for Flux; a set seen before
is a cache hit). Refitting 16-bit engines (TensorRT's Refitter with engines built REFIT and a map from
ONNX initializers to fused weights, as NVIDIA's demo does) would make 16-bit switches take seconds; it
is not built: tensorrt_rtx 1.7.1 exposes `Refitter` and `BuilderFlag.REFIT`, but without a GPU a REFIT
build fails inside Myelin (its CUDA_SUCCESS check) and no engine deserializes, so no refit code could
be exercised on the CPU machines the tests run on (measured on this repository's CI image).

A missing engine is built on first use (export, calibration for FP8/FP4, build) through the engine
cache, with progress reported as stage "build"; `python -m pipelines build` prebuilds the same
artifacts (same defaults, so the app finds them).
"""
from __future__ import annotations

import torch

from ...components import LoadedComponent, estimate_bytes
from ...device_policy import LIGHT_PARTS, DevicePolicy
from ...families import family_of
from ...engine_cache import EngineCache
from ...loading import WeightSource
from ...lora import NO_LORAS, LoraSet
from ...precision import Backend, Precision
from ...registry import ModelSpec
from ...run_context import JobCancelled, RunContext
from ..contract import TensorRTFailure, TensorRTOptions
from .artifacts import ArtifactBuilder, EngineRequest
from .export import ShapeRanges, component_io
from .quantize import QuantRecipe
from .runtime import DeviceMemoryPool, TensorRTEngine
from .trt_api import TensorRTUnavailable, Trt, import_trt


_LOW_PRECISION = {"FP8": Precision.FP8, "FP4E2M1": Precision.FP4}  # build-log type -> precision


def runs_as(precision: Precision, matmul_counts: dict[str, int]) -> str:
    """What the denoiser engine's matrix multiplies really run in, read from its build log."""
    precision = Precision.parse(precision)
    found = {_LOW_PRECISION[p] for p in matmul_counts if p in _LOW_PRECISION}
    if precision.is_16bit or precision in found:
        return precision.label
    return f"{precision.label} requested; the engine runs 16-bit matrix multiplies"


class TensorRTBackend:
    name = Backend.TENSORRT.value

    def __init__(self, engine_cache: EngineCache, options: TensorRTOptions = TensorRTOptions(), trt: Trt | None = None):
        self.cache = engine_cache
        self.options = options
        self._trt = trt
        self._pools: dict[tuple[str, str], DeviceMemoryPool] = {}

    @property
    def trt(self) -> Trt:
        if self._trt is None:
            self._trt = import_trt()
        return self._trt

    def describe(self) -> str:
        try:
            return f"TensorRT ({self.trt.describe()})"
        except TensorRTUnavailable:
            return "TensorRT (not installed)"

    def _pool(self, model: str, device: str) -> DeviceMemoryPool:
        """One scratch pool per pipeline (model) and device, shared by its engines."""
        return self._pools.setdefault((model, device), DeviceMemoryPool(device))

    def lora_variant(self, spec: ModelSpec, name: str, precision: Precision, loras: LoraSet) -> str:
        """An engine holds one LoRA set fused: each set is its own form (the digest of its files and scales)."""
        if name in LIGHT_PARTS:
            return ""
        quantized = name == spec.denoiser and not Precision.parse(precision).is_16bit
        return loras.digest(None if quantized else name)  # as EngineRequest.lora_digest

    def apply_loras(self, spec: ModelSpec, name: str, component: LoadedComponent, loras: LoraSet) -> None:
        """Nothing to do: the component was loaded under a key naming this very set (`lora_variant`)."""

    def request(self, spec: ModelSpec, name: str, precision: Precision, capability: tuple[int, int],
                source: WeightSource, loras: LoraSet = NO_LORAS) -> EngineRequest:
        o = self.options
        ranges = ShapeRanges.for_spec(spec, o.width, o.height, o.min_size, o.max_size, o.max_batch)
        precision = Precision.parse(precision)
        recipe = None if precision.is_16bit else QuantRecipe(precision, prompts=o.calibration_prompts,
                                                             steps=o.calibration_steps)
        return EngineRequest(spec, name, precision, ranges, capability, source, recipe=recipe,
                             onnx_source=o.onnx_source if name == spec.denoiser else "export",
                             weight_streaming=o.weight_streaming_budget is not None, loras=loras)

    def load_peak_bytes(self, spec: ModelSpec, name: str, precision: Precision, device: str, policy: DevicePolicy,
                        source: WeightSource = WeightSource()) -> int:
        """Device memory at the height of loading: the engine when it is built; otherwise the build's peak,
        which is the 16-bit torch module being exported (plus, for FP8/FP4, the whole pipeline that
        calibrates it: encoders, denoiser and VAE at once)."""
        if name in LIGHT_PARTS:
            return 0
        precision = Precision.parse(precision)
        if device.startswith("cuda") and policy.capability is not None:
            found = self.cache.lookup(ArtifactBuilder(self.cache, trt=self.trt).engine_key(
                self.request(spec, name, precision, policy.capability, source)))
            if found:
                return found.stat().st_size
        build = DevicePolicy.for_target(policy.capability)  # the export runs as the engine will
        if name != spec.denoiser or precision.is_16bit:
            return estimate_bytes(spec, name, precision, build)
        return sum(estimate_bytes(spec, part, build.sixteen_bit, build) for part in family_of(spec).adapters
                   if part in spec.components)  # a refiner has no text_encoder

    def load(self, spec: ModelSpec, name: str, precision: Precision, device: str, policy: DevicePolicy,
             source: WeightSource, ctx: RunContext | None = None, loras: LoraSet = NO_LORAS) -> LoadedComponent:
        capability = policy.capability
        if name in LIGHT_PARTS:
            raise ValueError(f"{name} is not a TensorRT component; tokenizers and schedulers come from the torch backend.")
        if capability is None:
            raise RuntimeError("TensorRT engines run on an NVIDIA GPU; on this machine use the torch backend "
                               "(engines can still be built ahead of time: python -m pipelines build --target sm121 ...).")
        report = (lambda done, total, message: ctx.report("build", done, total, message)) if ctx else None
        builder = ArtifactBuilder(self.cache, device=device, trt=self.trt, report=report)
        req = self.request(spec, name, precision, capability, source, loras)
        io = component_io(spec, name)
        try:
            built = builder.engine(req)
            engine = TensorRTEngine(built.engine, self.trt, device, pool=self._pool(spec.id, device),
                                    cuda_graphs=self.options.cuda_graphs and name == spec.denoiser,
                                    weight_streaming_budget=self.options.weight_streaming_budget,
                                    name=f"{spec.id} {name} engine",
                                    batch_inputs=frozenset(t.name for t in io.inputs if t.dims[:1] == ("batch",)))
        except (JobCancelled, torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the build, the export before it, or deserializing the plan
            raise TensorRTFailure(spec.id, name, Precision.parse(precision).value, "build or load", _reason(exc)) from exc
        label = runs_as(precision, built.report.precision_counts()) if name == spec.denoiser else None
        return LoadedComponent(_Guarded(engine, spec.id, name, Precision.parse(precision).value), engine.nbytes,
                               req.dtype, label)


def _reason(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Guarded:
    """An engine whose execution failures become TensorRTFailure (so the job reruns on PyTorch)."""

    def __init__(self, engine: TensorRTEngine, model: str, component: str, precision: str):
        self.engine, self.model, self.component, self.precision = engine, model, component, precision

    def __call__(self, **kwargs):
        try:
            return self.engine(**kwargs)
        except (JobCancelled, torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise TensorRTFailure(self.model, self.component, self.precision, "execution", _reason(exc)) from exc

    def __getattr__(self, name):  # load(), unload(), nbytes, io ... of the engine
        return getattr(self.engine, name)
