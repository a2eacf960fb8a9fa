"""FP8 and NVFP4 quantize/dequantize: one torch definition of the arithmetic, and its ONNX form.

Why our own ONNX form instead of ModelOpt's exporter: ModelOpt's ONNX path needs the legacy
exporter (which bakes Flux's batch size into the graph), emits a placeholder (`TRT_FP4QDQ`) that only
its `[onnx]` extras can rewrite (they downgrade onnx and pull in CUDA packages), and leaves fp32
scales that strongly typed TensorRT rejects next to 16-bit layers (research/feasibility-trt.md).
So ModelOpt calibrates (quantize.py), and the graph is written here:

1. Quantized Linear layers call `torch.ops.prism.fake_quant(x, amax, fmt)`. On torch it computes
   exactly what the engine will (the reference the tests compare against); both ONNX exporters
   emit it as a placeholder node `prism.FakeQuant`.
2. `lower_fake_quant` rewrites each placeholder into standard ONNX: weights are quantized here, once,
   and stored as FLOAT8E4M3FN / FLOAT4E2M1 initializers behind DequantizeLinear (so the ONNX is 2x /
   4x smaller than 16-bit); activations get QuantizeLinear + DequantizeLinear (FP8, calibrated
   per-tensor scale) or TensorRT's `TRT_FP4DynamicQuantize` + two DequantizeLinear (NVFP4: blocks of
   16, e4m3 block scales, calibrated fp32-range global scale). Every scale is in the layer's 16-bit
   type so DequantizeLinear outputs the type the next layer expects (strong typing).

Weights are quantized by the same torch functions as the reference, so torch, onnxruntime (FP8) and
TensorRT see the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...quant import FP4_BLOCK, FP4_MAX, FP4_VALUES, FP8_MAX

FMT_FP8 = "fp8"  # e4m3; per-tensor scale for activations, per-output-channel for weights
FMT_NVFP4 = "nvfp4"  # e2m1 in blocks of 16 along the last axis, e4m3 block scales, one global scale
FORMATS = (FMT_FP8, FMT_NVFP4)
PLACEHOLDER_DOMAIN = "prism"
PLACEHOLDER_OP = "FakeQuant"
TRT_DOMAIN = "trt"
QDQ_OPSET = 23  # FLOAT4E2M1 in DequantizeLinear and blocked dequantization need opset 23

_FP4_MID = (FP4_VALUES[1:] + FP4_VALUES[:-1]) / 2


# --------------------------------------------------------------------------- arithmetic (torch)

def _e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (0..15, sign in bit 3) for each value, ties to the even code as IEEE rounding does."""
    mag = v.abs().clamp(max=FP4_MAX)
    mid = _FP4_MID.to(v.device)
    index = torch.bucketize(mag, mid)  # a value equal to a midpoint lands on the lower neighbour
    tie = (index < len(mid)) & (mag == mid[index.clamp(max=len(mid) - 1)])
    index = torch.where(tie & (index % 2 == 1), index + 1, index)
    return (index | ((v < 0) & (index > 0)).to(index.dtype) << 3).to(torch.uint8)


def _e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    table = torch.cat([FP4_VALUES, -FP4_VALUES]).to(codes.device)
    return table[codes.long()]


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dequantization scale as the graph stores it: in the layer's 16-bit type."""
    return (amax.float() / FP8_MAX).clamp(min=1e-12).to(dtype)


def fp8_quantize(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, scale). `amax` is a scalar (per tensor) or (rows, 1) (per output channel)."""
    scale = fp8_scale(amax, x.dtype)
    return _to_e4m3(x.float() / scale.float()), scale


def fp8_fake_quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    q, scale = fp8_quantize(x, amax)
    return (q.float() * scale.float()).to(x.dtype)


@dataclass(frozen=True)
class Nvfp4Tensor:
    codes: torch.Tensor  # uint8, one e2m1 code per element, same shape as the input
    block_scale: torch.Tensor  # float8_e4m3fn, (..., K / 16)
    global_scale: torch.Tensor  # scalar in the 16-bit type

    def packed(self) -> torch.Tensor:
        """Two codes per byte, the even element in the low nibble (the ONNX FLOAT4E2M1 layout)."""
        flat = self.codes.reshape(-1, 2)
        return (flat[:, 0] | (flat[:, 1] << 4)).contiguous()


def nvfp4_global_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The per-tensor scale that puts the largest block scale at e4m3's top: amax / (6 * 448), in 16 bits."""
    return (amax.float() / (FP4_MAX * FP8_MAX)).clamp(min=1e-12).to(dtype)


def nvfp4_quantize(x: torch.Tensor, amax: torch.Tensor | None = None, global_scale: torch.Tensor | None = None) -> Nvfp4Tensor:
    """NVFP4 with a global scale from the calibrated (or weight) `amax`, or given; block scales from the data."""
    if x.shape[-1] % FP4_BLOCK:
        raise ValueError(f"NVFP4 needs the last dimension to be a multiple of {FP4_BLOCK}; got {tuple(x.shape)}")
    if global_scale is None:
        global_scale = nvfp4_global_scale(amax, x.dtype)
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // FP4_BLOCK, FP4_BLOCK)
    block_scale = _to_e4m3(blocks.abs().amax(dim=-1) / FP4_MAX / global_scale.float())
    # The divisor is exactly what DequantizeLinear will multiply by (the block scale in 16 bits).
    divisor = (block_scale.float() * global_scale.float()).to(x.dtype).float()
    safe = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    codes = _e2m1_codes(blocks / safe[..., None]).reshape(x.shape)
    return Nvfp4Tensor(codes, block_scale, global_scale)


def nvfp4_dequantize(q: Nvfp4Tensor, dtype: torch.dtype) -> torch.Tensor:
    divisor = (q.block_scale.float() * q.global_scale.float()).to(dtype).float()
    values = _e2m1_values(q.codes).reshape(*divisor.shape, FP4_BLOCK)
    return (values * divisor[..., None]).reshape(q.codes.shape).to(dtype)


def fake_quant_reference(x: torch.Tensor, amax: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == FMT_FP8:
        return fp8_fake_quant(x, amax)
    if fmt == FMT_NVFP4:
        return nvfp4_dequantize(nvfp4_quantize(x, amax), x.dtype)
    raise ValueError(f"Unknown quantization format {fmt!r}; choose one of {FORMATS}.")


# --------------------------------------------------------------------------- the placeholder op

@torch.library.custom_op("prism::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize-dequantize `x` (an activation, or a weight when `x` is a parameter). See module docs."""
    return fake_quant_reference(x, amax, fmt)


@fake_quant.register_fake
def _(x: torch.Tensor, amax: torch.Tensor, fmt: str) -> torch.Tensor:
    return torch.empty_like(x)


def _register_placeholder_schema() -> None:
    """The dynamo exporter only emits ops whose schema onnx knows; register ours once."""
    import onnx.defs
    from onnx.defs import OpSchema

    if onnx.defs.has(PLACEHOLDER_OP, PLACEHOLDER_DOMAIN):
        return
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = OpSchema(
        PLACEHOLDER_OP, PLACEHOLDER_DOMAIN, 1, doc="Quantize-dequantize placeholder, lowered by qdq.lower_fake_quant.",
        inputs=[OpSchema.FormalParameter("x", "T"), OpSchema.FormalParameter("amax", "tensor(float)")],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", types, "16- or 32-bit float")],
        attributes=[OpSchema.Attribute("fmt", OpSchema.AttrType.STRING, "fp8 or nvfp4"),
                    OpSchema.Attribute("dtype", OpSchema.AttrType.INT, "ONNX element type of x")])
    onnx.defs.register_schema(schema)


def _dynamo_translation(x, amax, fmt: str):
    import onnxscript

    _register_placeholder_schema()
    placeholder = getattr(onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1), PLACEHOLDER_OP)
    # `dtype` (the ONNX element type of x) tells the lowering which type the activation scales take.
    return placeholder(x, amax, fmt=fmt, dtype=int(x.dtype))


def dynamo_translation_table() -> dict:
    """For torch.onnx.export(dynamo=True, custom_translation_table=...)."""
    return {torch.ops.prism.fake_quant.default: _dynamo_translation}


class FakeQuantLinear(nn.Module):
    """A Linear whose input and weight pass through `fake_quant`.

    On torch it computes what the engine will; exported, its weight stays a parameter (so the ONNX
    initializer keeps the parameter's name) and the lowering stores it quantized.
    """

    def __init__(self, linear: nn.Linear, fmt: str, input_amax: float):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"Unknown quantization format {fmt!r}; choose one of {FORMATS}.")
        self.fmt = fmt
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        w = linear.weight.detach().float()
        # FP8 weights: one scale per output channel. NVFP4: the global scale; block scales come from the data.
        weight_amax = w.abs().amax(dim=1, keepdim=True) if fmt == FMT_FP8 else w.abs().amax()
        self.register_buffer("weight_amax", weight_amax)
        self.register_buffer("input_amax", torch.tensor(float(input_amax), device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.ops.prism.fake_quant(x, self.input_amax, self.fmt)
        w = torch.ops.prism.fake_quant(self.weight, self.weight_amax, self.fmt)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}"


QUANTIZED_MODULES = (FakeQuantLinear,)

_legacy_registered: set[int] = set()


def register_legacy_symbolic(opset: int) -> None:
    """Teach the TorchScript exporter the placeholder op (once per opset)."""
    if opset in _legacy_registered:
        return
    from torch.onnx import symbolic_helper

    def symbolic(g, x, amax, fmt):
        onnx_type = {"Float": 1, "Half": 10, "BFloat16": 16}[x.type().scalarType()]
        return g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", x, amax,
                    fmt_s=symbolic_helper._maybe_get_const(fmt, "s"), dtype_i=onnx_type)

    torch.onnx.register_custom_op_symbolic("prism::fake_quant", symbolic, opset)
    _legacy_registered.add(opset)


# --------------------------------------------------------------------------- lowering (onnx)

_TORCH_FROM_ONNX = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16}


@dataclass(frozen=True)
class LoweringReport:
    weights: int  # weight tensors stored quantized
    activations: int  # activation quantizers inserted
    fmt: set[str]  # formats found


def _to_torch(tensor, base_dir: Path | None) -> torch.Tensor:
    from onnx import numpy_helper

    # A writable copy: protobuf-backed arrays are read-only, which torch warns about.
    array = np.array(numpy_helper.to_array(tensor, base_dir=str(base_dir) if base_dir else ""), copy=True)
    if tensor.data_type == 16:  # bfloat16 arrives as ml_dtypes.bfloat16, which torch cannot take: pass the bits
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _tensor_proto(name: str, t: torch.Tensor, onnx_type: int, dims: tuple[int, ...] | None = None):
    from onnx import TensorProto

    proto = TensorProto()
    proto.name = name
    proto.data_type = onnx_type
    proto.dims.extend(list(dims if dims is not None else t.shape))
    proto.raw_data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return proto


def _scalar_like(name: str, value: torch.Tensor, onnx_type: int):
    return _tensor_proto(name, value.reshape(()), onnx_type, ())


def lower_fake_quant(model, base_dir: Path | None = None, on_weight: Callable[[str], None] | None = None,
                     device: str = "cpu") -> LoweringReport:
    """Rewrite every `prism.FakeQuant` node of `model` (an onnx ModelProto, changed in place).

    `base_dir` is where external weight data lives. Weights are read and replaced one at a time, so a
    12B transformer never needs two full copies in memory; they are quantized on `device` (a GPU does
    the NVFP4 rounding of 12B weights in seconds rather than minutes).
    """
    from onnx import TensorProto, helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def source(name: str) -> str:
        """Follow Identity nodes (the TorchScript exporter's de-duplicated constants) to an initializer."""
        while name not in inits and name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        return name

    new_nodes, new_inits = [], []
    weights = activations = 0
    formats: set = set()
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN or node.op_type != PLACEHOLDER_OP:
            new_nodes.append(node)
            continue
        fmt = next(a.s.decode() for a in node.attribute if a.name == "fmt")
        formats.add(fmt)
        x_name, amax_name = node.input[0], source(node.input[1])
        out = node.output[0]
        if amax_name not in inits:
            raise ValueError(f"{node.name}: the amax of a quantizer must be a constant; got {amax_name}")
        amax = _to_torch(inits[amax_name], base_dir).float()
        if source(x_name) in inits:  # a weight: quantize now, store the low-precision tensor
            x_name = source(x_name)
            w_proto = inits[x_name]
            dtype = _TORCH_FROM_ONNX[w_proto.data_type]
            w = _to_torch(w_proto, base_dir).to(device=device, dtype=dtype)
            amax = amax.to(device)
            base = x_name.removesuffix(".weight") if x_name.endswith(".weight") else x_name
            if fmt == FMT_FP8:
                q, scale = fp8_quantize(w, amax.reshape(-1, 1) if amax.numel() > 1 else amax)
                new_inits += [_tensor_proto(f"{base}.weight_fp8", q.view(torch.uint8).cpu(), TensorProto.FLOAT8E4M3FN),
                              _tensor_proto(f"{base}.weight_scale", scale.reshape(-1).cpu(), w_proto.data_type)]
                axis = [helper.make_attribute("axis", 0)] if amax.numel() > 1 else []
                dq = helper.make_node("DequantizeLinear", [f"{base}.weight_fp8", f"{base}.weight_scale"], [out],
                                      name=f"{base}.weight_dq")
                dq.attribute.extend(axis)
                new_nodes.append(dq)
            else:
                q = nvfp4_quantize(w, amax)
                new_inits += [
                    _tensor_proto(f"{base}.weight_fp4", q.packed().cpu(), TensorProto.FLOAT4E2M1, tuple(w.shape)),
                    _tensor_proto(f"{base}.weight_block_scale", q.block_scale.view(torch.uint8).cpu(), TensorProto.FLOAT8E4M3FN),
                    _scalar_like(f"{base}.weight_global_scale", q.global_scale.cpu(), w_proto.data_type)]
                new_nodes += [
                    helper.make_node("DequantizeLinear", [f"{base}.weight_block_scale", f"{base}.weight_global_scale"],
                                     [f"{base}.weight_block_scale_dq"], name=f"{base}.weight_scale_dq"),
                    helper.make_node("DequantizeLinear", [f"{base}.weight_fp4", f"{base}.weight_block_scale_dq"], [out],
                                     name=f"{base}.weight_dq", axis=-1, block_size=FP4_BLOCK)]
            weights += 1
            if on_weight:
                on_weight(x_name)
            continue
        # An activation: quantized at run time with the calibrated scale.
        onnx_type = next(a.i for a in node.attribute if a.name == "dtype")
        dtype = _TORCH_FROM_ONNX[onnx_type]
        tag = node.name or out
        if fmt == FMT_FP8:
            scale = fp8_scale(amax, dtype)
            new_inits += [_scalar_like(f"{tag}.scale", scale, onnx_type),
                          _scalar_like(f"{tag}.zero", torch.zeros((), dtype=torch.uint8), TensorProto.FLOAT8E4M3FN)]
            new_nodes += [
                helper.make_node("QuantizeLinear", [x_name, f"{tag}.scale", f"{tag}.zero"], [f"{tag}.q"], name=f"{tag}.q"),
                helper.make_node("DequantizeLinear", [f"{tag}.q", f"{tag}.scale", f"{tag}.zero"], [out], name=f"{tag}.dq")]
        else:
            global_scale = nvfp4_global_scale(amax, dtype)
            new_inits += [_scalar_like(f"{tag}.global_scale", global_scale, onnx_type)]
            new_nodes += [
                helper.make_node("TRT_FP4DynamicQuantize", [x_name, f"{tag}.global_scale"], [f"{tag}.fp4", f"{tag}.block_scale"],
                                 name=f"{tag}.fp4q", domain=TRT_DOMAIN, axis=-1, block_size=FP4_BLOCK,
                                 scale_type=TensorProto.FLOAT8E4M3FN),
                helper.make_node("DequantizeLinear", [f"{tag}.block_scale", f"{tag}.global_scale"], [f"{tag}.block_scale_dq"],
                                 name=f"{tag}.scale_dq"),
                helper.make_node("DequantizeLinear", [f"{tag}.fp4", f"{tag}.block_scale_dq"], [out], name=f"{tag}.dq",
                                 axis=-1, block_size=FP4_BLOCK)]
        activations += 1

    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _drop_unused(graph)
    _set_opsets(model, formats)
    return LoweringReport(weights, activations, formats)


def _drop_unused(graph) -> None:
    """Remove initializers and Identity/Constant nodes nothing reads any more (the replaced 16-bit weights)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("Identity", "Constant") and not set(n.output) & used]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _set_opsets(model, formats: set) -> None:
    """Standard ops at QDQ_OPSET (FLOAT4E2M1 / blocked DQ), the TensorRT domain for dynamic FP4, no placeholder."""
    opsets = {o.domain: o.version for o in model.opset_import}
    opsets[""] = max(opsets.get("", 0), QDQ_OPSET)
    opsets.pop(PLACEHOLDER_DOMAIN, None)
    if FMT_NVFP4 in formats:
        opsets[TRT_DOMAIN] = 1
    del model.opset_import[:]
    from onnx import helper

    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    if model.ir_version < 11:  # FLOAT4E2M1 needs IR version 11
        model.ir_version = 11
