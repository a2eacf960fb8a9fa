"""The SDXL refiner's UNet as a TensorRT engine, like the base's: ONNX export that onnxruntime runs as PyTorch does
(its 5 time ids with the aesthetic score, 1280-wide text states at full size), and a TensorRT-RTX build on the CPU."""
from __future__ import annotations

from dataclasses import replace

import onnx
import pytest
import torch

try:
    import onnxruntime as ort
    import tensorrt_rtx  # noqa: F401
except ImportError as exc:  # CI installs these (requirements-test.txt); a missing one is a failure, not a skip
    raise ImportError(f"The TensorRT tests need onnxruntime and tensorrt-rtx-cu13: {exc}") from exc

from pipelines.backends.tensorrt import export
from pipelines.backends.tensorrt.artifacts import ArtifactBuilder, EngineRequest
from pipelines.backends.tensorrt.build import LOG_SUFFIX, parse_layers
from pipelines.loading import load_component
from pipelines.precision import Precision
from pipelines.registry import read_local_spec
from pipelines.request import GenerationRequest

from test_tensorrt_export import DIMS, rel_err, run_both


@pytest.fixture(scope="module")
def refiner(tiny_sdxl_pair):
    return read_local_spec(tiny_sdxl_pair[1])


def _request(spec, dtype, target=(12, 0)) -> EngineRequest:
    ranges = export.ShapeRanges.for_spec(spec, min_size=32, max_size=128, max_batch=2)
    return EngineRequest(spec, "unet", Precision.FP16, ranges, target, graph_dtype=dtype)


def test_refiner_unet_exports_and_onnxruntime_matches_torch(refiner, trt_cache):
    path = ArtifactBuilder(trt_cache).onnx(_request(refiner, torch.float32))
    io = export.component_io(refiner, "unet")
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs["time_ids"][1] == 5 and inputs["encoder_hidden_states"][2] == 32  # aesthetic score; bigG width
    module = io.adapter(load_component(refiner, "unet", dtype=torch.float32, device="cpu")).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for dims in DIMS:  # shapes other than the traced ones: nothing baked in
        got, ref = run_both(session, module, io, torch.float32, dims, vocab=100)
        assert got[0].shape == tuple(ref[0].shape) and rel_err(got[0], ref[0]) < 1e-4, dims


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_refiner_unet_builds_with_tensorrt_rtx(refiner, trt_cache, dtype):
    built = ArtifactBuilder(trt_cache).engine(_request(refiner, dtype))
    assert built.engine.is_file() and built.engine.stat().st_size == built.report.engine_bytes > 0
    assert built.report.target == "sm120" and "TensorRT-RTX" in built.report.flavour
    assert parse_layers(built.engine.with_name(built.engine.name + LOG_SUFFIX).read_text())
    assert set(built.report.matmuls.values()) == {"Half" if dtype == torch.float16 else "BFloat16"}
    assert ArtifactBuilder(trt_cache).engine_key(_request(refiner, dtype)).model == "tiny-sdxl-refiner"  # its own


def test_a_base_and_refiner_job_runs_both_unets_as_engines(tiny_sdxl_pair, trt_cache):
    """The manager asks the TensorRT backend for the refiner's UNet as for any denoiser (the fake GPU runs the real
    built plans' ONNX in onnxruntime); FP8 refiner engines are not calibrated yet: that job reruns on PyTorch and
    says why, and the model's later FP8 jobs go straight to PyTorch."""
    from test_tensorrt_fallback import OPTIONS
    from test_tensorrt_runtime import _manager

    base, _ = tiny_sdxl_pair
    request = GenerationRequest(prompt="a red fox", model=str(base), precision="fp16", steps=4, seed=3, width=32,
                                height=32, backend="tensorrt", refiner=0.5)
    manager = _manager(trt_cache, OPTIONS)
    try:
        result = manager.generate(request, timeout=600)
        engines = {(r.key.model, r.key.name) for r in manager.status().resident if r.key.backend == "tensorrt"}
        fp8 = manager.generate(replace(request, precision="fp8"), timeout=600)
        again = manager.generate(replace(request, precision="fp8", seed=4), timeout=600)
    finally:
        manager.close()
    assert result.backend.startswith("TensorRT") and result.timings.refiner_steps == 2, result.warnings
    assert {("tiny-sdxl-base", "unet"), ("tiny-sdxl-refiner", "unet")} <= engines
    assert fp8.backend.startswith("PyTorch") and fp8.timings.refiner_steps == 2
    assert any("FP8/FP4 engines of a refiner are not calibrated yet" in w and w.endswith("ran on PyTorch.")
               for w in fp8.warnings), fp8.warnings
    assert any(w.startswith("TensorRT failed earlier") for w in again.warnings), again.warnings
