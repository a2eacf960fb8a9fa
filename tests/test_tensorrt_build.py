"""TensorRT-RTX builds every tiny component ahead of time (no GPU), and says what precision each layer runs in.

The layer precisions come from the builder's own per-layer table (the build log kept beside each
engine): FP8 / FP4 matrix multiplies where the recipe quantizes, 16-bit where it keeps layers.
Builds a GPU cannot run are refused before any work, with the reason; TensorRT agrees with the rule.
"""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

try:
    import modelopt  # noqa: F401
    import tensorrt_rtx  # noqa: F401
except ImportError as exc:  # CI installs these (requirements-test.txt); a missing one is a failure, not a skip
    raise ImportError(f"The TensorRT tests need nvidia-modelopt[torch] and tensorrt-rtx-cu13: {exc}") from exc

from pipelines.backends.tensorrt import export
from pipelines.backends.tensorrt.artifacts import ArtifactBuilder, EngineRequest
from pipelines.backends.tensorrt.build import LOG_SUFFIX, matmul_modules, parse_layers
from pipelines.backends.tensorrt.quantize import QuantRecipe
from pipelines.backends.tensorrt.trt_api import BuildFailed, BuildRefused, BuildSettings, build_serialized, import_trt, make_logger
from pipelines.families import family_of
from pipelines.engine_cache import EngineCache
from pipelines.loading import load_component
from pipelines.precision import Precision
from conftest import TINY_COMPONENTS

# The same recipes and cache folder as test_tensorrt_export.py, so artifacts made there are reused.
SMALL = {Precision.FP8: QuantRecipe(Precision.FP8, prompts=2, steps=2), Precision.FP4: QuantRecipe(Precision.FP4, prompts=2, steps=2)}
TARGETS = {"sm89": (8, 9), "sm120": (12, 0)}
SIXTEEN = {torch.float16: "Half", torch.bfloat16: "BFloat16"}
WIDTH = {**SIXTEEN, torch.float32: "Float"}
COMPONENTS = TINY_COMPONENTS


def request(spec, component, precision, target, dtype=None, **kw) -> EngineRequest:
    ranges = export.ShapeRanges.for_spec(spec, min_size=32, max_size=128, max_batch=2)
    return EngineRequest(spec, component, precision, ranges, target, recipe=SMALL.get(precision), graph_dtype=dtype, **kw)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", SIXTEEN, ids=["fp16", "bf16"])
@pytest.mark.parametrize("family,component", COMPONENTS)
def test_every_component_builds_in_16_bit(specs, trt_cache, family, component, dtype, target):
    builder = ArtifactBuilder(trt_cache)
    req = request(specs[family], component, Precision.FP16, TARGETS[target], dtype)
    built = builder.engine(req)
    assert built.engine.is_file() and built.engine.stat().st_size == built.report.engine_bytes > 0
    assert built.report.target == target and "TensorRT-RTX" in built.report.flavour
    layers = parse_layers(built.engine.with_name(built.engine.name + LOG_SUFFIX).read_text())
    assert layers, "the build log keeps the per-layer table"
    # Every layer with weights in the graph is in the table and multiplies in its torch weight's type:
    # the graph's 16-bit type, except where the model keeps a layer in fp32 (T5's `wo` in fp16). Layers
    # whose output the graph never uses (CLIP's last layer, for the penultimate state) are not exported.
    spec = specs[family]
    io = export.component_io(spec, component)
    module = io.adapter(load_component(spec, io.weights, dtype=dtype, device="cpu"))
    weights = {name: m.weight.dtype for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    in_graph = set(matmul_modules(onnx.load(str(built.onnx or builder.onnx(req)), load_external_data=False)).values())
    assert in_graph and in_graph <= set(weights)
    assert built.report.matmuls == {m: WIDTH[weights[m]] for m in in_graph}
    assert list(weights.values()).count(dtype) > len(weights) // 2


@pytest.mark.parametrize("precision,target,expected", [(Precision.FP8, "sm89", "FP8"), (Precision.FP8, "sm120", "FP8"),
                                                       (Precision.FP4, "sm120", "FP4E2M1")], ids=["fp8-sm89", "fp8-sm120", "fp4-sm120"])
@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_quantized_layers_run_quantized_and_anchors_stay_16_bit(specs, trt_cache, family, precision, target, expected):
    spec = specs[family]
    req = request(spec, spec.denoiser, precision, TARGETS[target])
    builder = ArtifactBuilder(trt_cache)
    built = builder.engine(req)
    amax = builder.calibration(req)[1]["amax"]
    matmuls = built.report.matmuls
    prefix = spec.denoiser + "."
    assert {prefix + layer for layer in amax} <= set(matmuls)
    assert all(matmuls[prefix + layer] == expected for layer in amax), matmuls
    keep = family_of(spec).keep_16bit
    anchors = {m: p for m, p in matmuls.items() if m.split(".")[1] in keep}
    assert anchors and set(anchors.values()) == {SIXTEEN[req.dtype]}, anchors
    others = {m: p for m, p in matmuls.items() if m[len(prefix):] not in amax}
    assert all(p in SIXTEEN.values() for p in others.values()), others  # convolutions and kept layers


@pytest.mark.parametrize("family,precision,target,dtype,reason", [
    ("flux", Precision.FP4, (8, 9), None, "FP4 tensor cores"),
    ("sdxl", Precision.FP8, (8, 6), None, "FP8 needs compute capability 8.9"),
    ("sdxl", Precision.FP16, (7, 5), torch.bfloat16, "BF16 needs compute capability 8.0"),
], ids=["fp4-sm89", "fp8-sm86", "bf16-sm75"])
def test_wrong_hardware_is_refused_before_any_work(specs, tmp_path, family, precision, target, dtype, reason):
    spec = specs[family]
    builder = ArtifactBuilder(EngineCache(tmp_path))
    with pytest.raises(BuildRefused, match=reason) as refused:
        builder.engine(request(spec, spec.denoiser, precision, target, dtype))
    assert f"sm{target[0]}{target[1]}" in str(refused.value)
    assert not list(tmp_path.iterdir()), "nothing was exported or calibrated for a refused build"


def test_tensorrt_itself_refuses_fp4_for_ada(specs, trt_cache):
    """Our rule is TensorRT's: forced past our check, the builder rejects the FP4 graph for sm89."""
    spec = specs["flux"]
    req = request(spec, spec.denoiser, Precision.FP4, (12, 0))
    onnx_path = ArtifactBuilder(trt_cache).onnx(req)
    trt = import_trt()
    profile = export.profile(spec, export.component_io(spec, spec.denoiser), req.ranges)
    with pytest.raises(BuildFailed, match="fp4"):
        build_serialized(trt, onnx_path, BuildSettings((8, 9), (profile,)), make_logger(trt))


def test_weight_streaming_engines_are_their_own_artifacts(specs, trt_cache):
    spec = specs["sdxl"]
    builder = ArtifactBuilder(trt_cache)
    plain = builder.engine(request(spec, "vae", Precision.FP16, (12, 0), torch.float16))
    streaming = builder.engine(request(spec, "vae", Precision.FP16, (12, 0), torch.float16, weight_streaming=True))
    assert streaming.engine != plain.engine and streaming.engine.is_file()
    assert "weight-streaming" in builder.engine_key(request(spec, "vae", Precision.FP16, (12, 0), torch.float16,
                                                            weight_streaming=True)).recipe
