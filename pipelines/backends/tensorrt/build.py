"""Building an engine from ONNX: the target GPU, what it refuses, and what the build log says about precisions.

A build for a GPU that cannot run the precision is refused before TensorRT starts, with the same
reason the UI shows (`pipelines.precision.precision_support`). After a build we keep, beside the
engine, the builder's log (warnings plus the per-layer table) and a JSON summary of which precision
each matrix multiply runs in, read from that table: the only way to see layer precisions without a
GPU (the engine inspector needs one).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...precision import Backend, Capability, Precision, precision_support
from .trt_api import BuildRefused, BuildSettings, Trt, build_serialized, current_capability, make_logger

LOG_SUFFIX = ".buildlog.txt"
LAYERS_SUFFIX = ".layers.json"

# Narrowest first: a layer's matrix-multiply precision is the narrowest type among its operands.
_WIDTH = {"FP4E2M1": 4, "Int4": 4, "FP8": 8, "Int8": 8, "Half": 16, "BFloat16": 16, "Float": 32, "Int32": 32, "Int64": 64}
_MATMUL_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
_PARAM = re.compile(r"\.(weight|weight_fp8|weight_fp4)$")


def parse_target(text: str) -> Capability:
    """'sm89' -> (8, 9), 'sm121' -> (12, 1), 'current' -> this machine's GPU."""
    value = text.strip().lower()
    if value == "current":
        here = current_capability()
        if here is None:
            raise BuildRefused("There is no GPU here, so --target current has nothing to build for; "
                               "name the GPU instead: --target sm89 (Ada), sm120 (RTX 50) or sm121 (DGX Spark).")
        return here
    match = re.fullmatch(r"sm_?(\d+)(\d)", value)
    if not match:
        raise BuildRefused(f"Unknown target {text!r}; write sm89, sm120, sm121 or current.")
    return int(match.group(1)), int(match.group(2))


def target_name(target: Capability) -> str:
    return f"sm{target[0]}{target[1]}"


def refusal(target: Capability, needs: tuple[Precision, ...]) -> str | None:
    """Why a GPU of compute capability `target` cannot run an engine needing `needs`; None when it can."""
    for precision in needs:
        support = precision_support(precision, target, Backend.TENSORRT)
        if not support.runnable:
            return support.reason.replace("this GPU is", f"the target {target_name(target)} is")
    return None


# --------------------------------------------------------------------------- the build log's layer table

@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str
    inputs: tuple[str, ...]  # data types
    constants: tuple[str, ...]
    outputs: tuple[str, ...]
    onnx_nodes: tuple[str, ...]

    @property
    def narrowest(self) -> str | None:
        types = [t for t in self.inputs + self.constants if t in _WIDTH]
        return min(types, key=_WIDTH.__getitem__) if types else None


_SECTION = re.compile(r"(Inputs|Constants|Outputs): \[(.*?)\](?=, (?:Constants|Outputs|TacticName|StreamId|Metadata)|$)")


def parse_layers(log_text: str) -> list[LayerInfo]:
    """The per-layer table TensorRT prints at VERBOSE with profiling_verbosity=DETAILED."""
    start = log_text.find("Layers:")
    if start < 0:
        return []
    layers = []
    for line in log_text[start:].splitlines()[1:]:
        if not line.startswith("Name: "):
            if layers:
                break
            continue
        head = re.match(r"Name: (.*?), LayerType: ([^,]*)", line)
        if not head:
            continue
        sections = {k: re.findall(r"Datatype: (\w+)", v) for k, v in _SECTION.findall(line)}
        nodes = re.findall(r"\[ONNX Layer: ([^\]]+)\]", line)
        layers.append(LayerInfo(head.group(1), head.group(2), tuple(sections.get("Inputs", ())),
                                tuple(sections.get("Constants", ())), tuple(sections.get("Outputs", ())), tuple(nodes)))
    return layers


def matmul_modules(onnx_model) -> dict[str, str]:
    """ONNX node name -> the torch module whose weight it multiplies, for every MatMul/Gemm/Conv with a weight.

    The dynamo exporter records the module path in node metadata; the TorchScript exporter keeps
    parameter names on initializers, which we reach by walking back through Transpose/Dequantize/Cast.
    """
    producers = {out: node for node in onnx_model.graph.node for out in node.output}
    initializers = {t.name for t in onnx_model.graph.initializer}
    result = {}
    for node in onnx_model.graph.node:
        if node.op_type not in _MATMUL_OPS or len(node.input) < 2:
            continue
        module, name = None, node.input[1]
        for _ in range(6):  # weight -> [DequantizeLinear] -> [Transpose] -> [Cast] -> MatMul
            if name in initializers:
                break
            producer = producers.get(name)
            if producer is None or producer.op_type not in ("Transpose", "DequantizeLinear", "Cast", "Reshape", "Identity"):
                break
            name = producer.input[0]
        if name not in initializers:
            continue  # activation x activation (attention): not a layer with weights
        if _PARAM.search(name):
            module = _PARAM.sub("", name)
        if module is None and node.name.startswith("/"):  # TorchScript names nodes /module/path/Op
            module = ".".join(node.name.strip("/").split("/")[:-1]) or None
        if module is None:
            scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
            if scopes:
                path = [s.strip(" '") for s in scopes.strip("[]").split(",")]
                module = next((p for p in reversed(path[:-1]) if p), None)
        if module:
            result[node.name] = module
    return result


def matmul_precisions(layers: list[LayerInfo], node_modules: dict[str, str]) -> dict[str, str]:
    """Torch module -> the narrowest data type its matrix multiply runs in (FP4E2M1, FP8, Half, BFloat16, Float)."""
    out: dict[str, str] = {}
    for layer in layers:
        modules = {node_modules[n] for n in layer.onnx_nodes if n in node_modules}
        precision = layer.narrowest
        if not modules or precision is None:
            continue
        for module in modules:
            previous = out.get(module)
            if previous is None or _WIDTH[precision] < _WIDTH[previous]:
                out[module] = precision
    return out


# --------------------------------------------------------------------------- building

@dataclass(frozen=True)
class BuildReport:
    engine: str
    seconds: float
    engine_bytes: int
    target: str
    flavour: str
    matmuls: dict[str, str] = field(default_factory=dict)  # module -> precision

    def precision_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.matmuls.values():
            counts[p] = counts.get(p, 0) + 1
        return counts


def timing_cache_path(cache_root: Path, trt: Trt, target: Capability) -> Path:
    """One timing cache per TensorRT flavour, version and GPU, kept in engine_cache/ across builds."""
    return cache_root / f"timing-cache__{trt.flavour}-{trt.version}__{target_name(target)}.bin"


def build_engine(trt: Trt, onnx_path: Path, out: Path, settings: BuildSettings, needs: tuple[Precision, ...],
                 timing_cache: Path | None = None) -> BuildReport:
    """Build `onnx_path` into the plan file `out`; the log and layer summary go beside it."""
    reason = refusal(settings.target, needs)
    if reason:
        raise BuildRefused(f"Not building {onnx_path.name} for {target_name(settings.target)}: {reason}")
    logger = make_logger(trt)
    started = time.monotonic()
    if current_capability() is None:
        timing_cache = None  # without a GPU nothing is timed, and TensorRT-RTX cannot read its cache back
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else None
    try:
        plan, new_cache = build_serialized(trt, onnx_path, settings, logger, cache_bytes)
    finally:
        Path(str(out) + LOG_SUFFIX).write_text(logger.text())
    seconds = time.monotonic() - started
    out.write_bytes(plan)
    if timing_cache and new_cache:
        tmp = timing_cache.with_name(timing_cache.name + ".tmp")
        tmp.write_bytes(new_cache)
        tmp.replace(timing_cache)  # atomic: a concurrent build sees the old or the new cache, never half

    import onnx

    node_modules = matmul_modules(onnx.load(str(onnx_path), load_external_data=False))
    matmuls = matmul_precisions(parse_layers(logger.text()), node_modules)
    report = BuildReport(out.name, round(seconds, 3), len(plan), target_name(settings.target), trt.describe(), matmuls)
    Path(str(out) + LAYERS_SUFFIX).write_text(json.dumps(asdict(report), indent=1, sort_keys=True))
    return report


def read_report(engine_path: Path) -> BuildReport:
    return BuildReport(**json.loads(Path(str(engine_path) + LAYERS_SUFFIX).read_text()))
