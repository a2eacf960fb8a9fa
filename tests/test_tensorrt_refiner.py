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
    built plans' ONNX in onnxruntime), at 16 bits and at FP8, whose calibration runs the pair."""
    from test_tensorrt_fallback import OPTIONS
    from test_tensorrt_runtime import _manager

    base, _ = tiny_sdxl_pair
    request = GenerationRequest(prompt="a red fox", model=str(base), precision="fp16", steps=4, seed=3, width=32,
                                height=32, backend="tensorrt", refiner=0.5)
    manager = _manager(trt_cache, OPTIONS)
    try:
        results = [manager.generate(replace(request, precision=p), timeout=600) for p in ("fp16", "fp8")]
        engines = {(r.key.model, r.key.name, r.key.variant) for r in manager.status().resident
                   if r.key.backend == "tensorrt"}
    finally:
        manager.close()
    for result in results:
        assert result.backend.startswith("TensorRT") and result.timings.refiner_steps == 2, result.warnings
        assert not any("TensorRT failed" in w for w in result.warnings), result.warnings
    assert {("tiny-sdxl-base", "unet", "fp8"), ("tiny-sdxl-refiner", "unet", "fp8")} <= engines


def test_the_refiner_fp8_engine_is_calibrated_in_its_base_loop(tiny_sdxl_pair, trt_cache):
    """Calibration runs the base's first steps and the refiner from the hand-off (what the refiner sees in use):
    every quantizable layer of the refiner got a range, and the engine multiplies in FP8 there."""
    from pipelines.backends.tensorrt.quantize import QuantRecipe, calibrate
    from pipelines.loading import WeightSource
    from pipelines.registry import refiner_of

    refiner = refiner_of(read_local_spec(tiny_sdxl_pair[0]))  # reached through its base: it knows the base
    ranges = export.ShapeRanges.for_spec(refiner, min_size=32, max_size=128, max_batch=2)
    req = EngineRequest(refiner, "unet", Precision.FP8, ranges, (12, 0),
                        recipe=QuantRecipe(Precision.FP8, prompts=2, steps=2))
    builder = ArtifactBuilder(trt_cache)
    built = builder.engine(req)
    calibration = builder.calibration(req)[1]
    assert calibration["amax"] and not calibration["left_16bit"]
    assert all(built.report.matmuls["unet." + layer] == "FP8" for layer in calibration["amax"])
    alone = replace(refiner, base=None)  # the registry's rule finds no base for a local folder
    with pytest.raises(ValueError, match="is a refiner and no base model names it"):
        calibrate(alone, QuantRecipe(Precision.FP8, prompts=1, steps=2), WeightSource(), "cpu", None)
