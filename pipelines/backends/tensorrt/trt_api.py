"""The one adapter over `tensorrt` (full, NVIDIA's container) and `tensorrt_rtx` (pip), imported lazily.

Everything else in this package calls these functions and never the TensorRT module directly, so
the two flavours' differences live here:
- full TensorRT builds only for the GPU it runs on; TensorRT-RTX builds ahead of time for named
  compute capabilities, without a GPU (research/feasibility-trt.md);
- both parse ONNX into strongly typed networks (TensorRT 10+/RTX: the ONNX types are the precisions);
- runtime device-memory and weight-streaming calls differ slightly between releases.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger("prism.tensorrt")

Capability = tuple[int, int]

# Lines of TensorRT's VERBOSE log that we keep: the per-layer table and I/O profile the builder prints
# with profiling_verbosity=DETAILED (the engine inspector needs a GPU; this does not).
_KEEP_VERBOSE = ("Layers:", "I/O Tensors:", "Engine Metadata")


class TensorRTUnavailable(RuntimeError):
    """Neither TensorRT flavour is installed (or it does not import). The message says how to get one."""


class BuildRefused(ValueError):
    """A build that cannot produce a working engine; the message gives the reason and what to change."""


class BuildFailed(RuntimeError):
    """TensorRT tried and failed; the message holds its errors."""


@dataclass(frozen=True)
class Trt:
    module: ModuleType
    flavour: str  # "tensorrt" | "tensorrt-rtx"
    version: str

    @property
    def builds_for_other_gpus(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    def describe(self) -> str:
        return f"{'TensorRT-RTX' if self.flavour == 'tensorrt-rtx' else 'TensorRT'} {self.version}"


def import_trt(prefer: str | None = None) -> Trt:
    """Full TensorRT when installed (it runs on every datacenter GPU), else TensorRT-RTX."""
    order = [("tensorrt", "tensorrt"), ("tensorrt_rtx", "tensorrt-rtx")]
    if prefer:
        order.sort(key=lambda item: item[1] != prefer)
    problems = []
    for module_name, flavour in order:
        if importlib.util.find_spec(module_name) is None:
            continue
        try:
            module = importlib.import_module(module_name)
            return Trt(module, flavour, str(module.__version__))
        except Exception as exc:  # the PyPI `tensorrt` stub or a CUDA mismatch: try the other flavour
            problems.append(f"{module_name}: {exc}")
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise TensorRTUnavailable(
        "TensorRT is not available" + detail + ". NVIDIA's PyTorch container ships full TensorRT; elsewhere "
        "`pip install tensorrt-rtx-cu13` builds engines (also without a GPU).")


def make_logger(trt: Trt) -> Any:
    """A TensorRT ILogger that keeps the lines worth saving and forwards warnings and errors to logging."""
    base = trt.module.ILogger

    class CaptureLogger(base):
        def __init__(self):
            base.__init__(self)
            self.lines: list[tuple[int, str]] = []
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)
            if level <= 1:
                self.errors.append(msg)
                log.error("%s", msg)
            elif level == 2:
                log.warning("%s", msg)
            if level <= 3 or msg.startswith(_KEEP_VERBOSE):
                self.lines.append((level, msg))

        def text(self) -> str:
            names = {0: "INTERNAL_ERROR", 1: "ERROR", 2: "WARNING", 3: "INFO", 4: "VERBOSE"}
            return "\n".join(f"[{names.get(level, level)}] {msg}" for level, msg in self.lines) + "\n"

    return CaptureLogger()


def current_capability() -> Capability | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def _compute_capability_enum(trt: Trt, target: Capability) -> Any:
    name = f"SM{target[0]}{target[1]}"
    enum = trt.module.ComputeCapability
    if not hasattr(enum, name):
        offered = ", ".join(n.lower() for n in enum.__members__ if n.startswith("SM"))
        raise BuildRefused(f"{trt.describe()} cannot build for {name.lower()}; it offers {offered}.")
    return getattr(enum, name)


@dataclass(frozen=True)
class BuildSettings:
    target: Capability
    profiles: tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], ...]
    weight_streaming: bool = False
    optimization_level: int | None = None  # None: TensorRT's default (3)
    workspace_bytes: int | None = None


def build_serialized(trt: Trt, onnx_path: Path, settings: BuildSettings, logger: Any,
                     timing_cache: bytes | None = None) -> tuple[bytes, bytes | None]:
    """Parse `onnx_path` into a strongly typed network and build it. Returns (plan, updated timing cache)."""
    t = trt.module
    here = current_capability()
    if not trt.builds_for_other_gpus and here != settings.target:
        where = f"this GPU is sm{here[0]}{here[1]}" if here else "there is no GPU here"
        raise BuildRefused(f"Full TensorRT builds only for the GPU it runs on ({where}); to build for "
                           f"sm{settings.target[0]}{settings.target[1]}, build on that GPU or install TensorRT-RTX "
                           "(`pip install tensorrt-rtx-cu13`), which builds ahead of time.")
    builder = t.Builder(logger)
    network = builder.create_network(1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = t.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildFailed(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    if trt.builds_for_other_gpus:
        config.num_compute_capabilities = 1  # must precede set_compute_capability (feasibility note)
        config.set_compute_capability(_compute_capability_enum(trt, settings.target), 0)
    config.profiling_verbosity = t.ProfilingVerbosity.DETAILED  # the per-layer table in the build log
    if settings.weight_streaming:
        config.set_flag(t.BuilderFlag.WEIGHT_STREAMING)
    if settings.optimization_level is not None:
        config.builder_optimization_level = settings.optimization_level
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(t.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    cache = None
    if hasattr(config, "create_timing_cache"):
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for ranges in settings.profiles:
        missing = [n for n, tensor in inputs.items() if n not in ranges and any(d < 0 for d in tensor.shape)]
        if missing:
            raise BuildFailed(f"No shape range for dynamic input(s) {missing} of {onnx_path.name}.")
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in ranges.items():
            if name not in inputs:
                raise BuildFailed(f"{onnx_path.name} has no input {name!r}; its inputs are {sorted(inputs)}.")
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = "; ".join(logger.errors[-3:]) or "no error was logged"
        raise BuildFailed(f"TensorRT failed to build {onnx_path.name}: {detail}")
    new_cache = bytes(memoryview(config.get_timing_cache().serialize())) if cache is not None else None
    return bytes(memoryview(plan)), new_cache


# --------------------------------------------------------------------------- runtime

def torch_dtype(trt: Trt, data_type: Any):
    import torch

    t = trt.module
    table = {t.float32: torch.float32, t.float16: torch.float16, t.bfloat16: torch.bfloat16, t.int32: torch.int32,
             t.int64: torch.int64, t.int8: torch.int8, t.bool: torch.bool, t.uint8: torch.uint8}
    if data_type not in table:
        raise TypeError(f"Engine I/O type {data_type} has no torch equivalent here.")
    return table[data_type]


@dataclass(frozen=True)
class IOTensor:
    name: str
    is_input: bool
    dtype: Any  # torch dtype
    shape: tuple[int, ...]  # -1 where dynamic
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None  # inputs: (min, opt, max) of profile 0


def engine_io(trt: Trt, engine: Any) -> list[IOTensor]:
    """The engine's inputs and outputs in its own order (outputs in the ONNX graph's order)."""
    t = trt.module
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == t.TensorIOMode.INPUT
        profile = None
        if is_input:
            profile = tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, 0))
        out.append(IOTensor(name, is_input, torch_dtype(trt, engine.get_tensor_dtype(name)),
                            tuple(int(d) for d in engine.get_tensor_shape(name)), profile))
    return out


def deserialize(trt: Trt, plan: bytes, logger: Any) -> Any:
    runtime = trt.module.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        detail = "; ".join(logger.errors[-2:]) or "no reason given"
        raise RuntimeError(f"{trt.describe()} could not load the engine on this GPU ({detail}). "
                           "Rebuild it here (`python -m pipelines build ... --target current`).")
    engine._prism_runtime = runtime  # the runtime must outlive the engine
    return engine


def create_context(trt: Trt, engine: Any, user_memory: bool) -> Any:
    """An execution context; with `user_memory` it takes its scratch memory from our shared pool."""
    if user_memory and hasattr(trt.module, "ExecutionContextAllocationStrategy"):
        return engine.create_execution_context(trt.module.ExecutionContextAllocationStrategy.USER_MANAGED)
    return engine.create_execution_context()


def context_memory_bytes(engine: Any) -> int:
    for name in ("device_memory_size_v2", "device_memory_size"):
        if hasattr(engine, name):
            return int(getattr(engine, name))
    return 0


def scratch_bytes_for_shapes(context: Any, engine: Any) -> int:
    """Scratch memory the context needs for the input shapes just set (TensorRT 10.1+), else for the largest."""
    if hasattr(context, "update_device_memory_size_for_shapes"):
        return int(context.update_device_memory_size_for_shapes())
    return context_memory_bytes(engine)


def set_context_memory(context: Any, ptr: int, nbytes: int) -> None:
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(ptr, nbytes)
    else:
        context.device_memory = ptr


def set_weight_streaming_budget(engine: Any, budget_bytes: int) -> bool:
    """Keep at most `budget_bytes` of weights on the GPU (the rest streams from host memory)."""
    if hasattr(engine, "weight_streaming_budget_v2"):
        engine.weight_streaming_budget_v2 = budget_bytes
        return True
    return False
