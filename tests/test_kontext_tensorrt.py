"""The tiny Kontext transformer through the TensorRT chain on a CPU: ONNX export (onnxruntime agrees with torch at
noise and context token counts that differ), and TensorRT-RTX builds whose profile spans noise + context tokens."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

try:
    import modelopt  # noqa: F401
    import tensorrt_rtx  # noqa: F401
except ImportError as exc:  # CI installs these (requirements-test.txt); a missing one is a failure, not a skip
    raise ImportError(f"The TensorRT tests need nvidia-modelopt[torch] and tensorrt-rtx-cu13: {exc}") from exc

from pipelines.backends.tensorrt import export
from pipelines.backends.tensorrt.artifacts import ArtifactBuilder, EngineRequest
from pipelines.backends.tensorrt.build import LOG_SUFFIX
from pipelines.backends.tensorrt.quantize import QuantRecipe
from pipelines.loading import load_component
from pipelines.precision import Precision
from pipelines.registry import read_local_spec

# Noise and context token counts differ in each, so a graph that mixed them up would fail.
DIMS = ({"batch": 1, "img_tokens": 6, "ctx_tokens": 16}, {"batch": 2, "img_tokens": 20, "ctx_tokens": 4})


@pytest.fixture(scope="module")
def spec(tiny_kontext):
    return read_local_spec(tiny_kontext)


def request(spec, precision=Precision.FP16, dtype=None, recipe=None) -> EngineRequest:
    ranges = export.ShapeRanges.for_spec(spec, min_size=32, max_size=128, max_batch=2)
    return EngineRequest(spec, "transformer", precision, ranges, (8, 9), recipe=recipe, graph_dtype=dtype)


def test_onnx_export_matches_torch(spec, trt_cache):
    path = ArtifactBuilder(trt_cache).onnx(request(spec, dtype=torch.float32))
    io = export.component_io(spec, "transformer")
    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == [t.name for t in io.inputs]
    module = io.adapter(load_component(spec, "transformer", dtype=torch.float32, device="cpu")).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for dims in DIMS:
        x = export.sample_inputs(io, torch.float32, "cpu", dims=dims, seed=1)
        (got,) = session.run(None, {k: v.numpy() for k, v in x.items()})
        with torch.no_grad():
            ref = module(**x)
        assert got.shape == (dims["batch"], dims["img_tokens"], 16)  # the noise tokens' prediction only
        assert float(np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy())) < 1e-4


def test_profile_spans_noise_plus_context_tokens(spec):
    shapes = export.profile(spec, export.component_io(spec, "transformer"), request(spec).ranges)
    # 32..128 px at a VAE factor of 2 and 2x2 patches: 64..1024 tokens each for the noise and the context.
    assert shapes["hidden_states"][0][1] == shapes["image_latents"][0][1] == 64
    assert shapes["hidden_states"][2][1] == shapes["image_latents"][2][1] == 1024
    assert shapes["img_ids"][2] == shapes["image_ids"][2] == (1024, 3)


@pytest.mark.parametrize("precision,recipe", [(Precision.FP16, None),
                                              (Precision.FP8, QuantRecipe(Precision.FP8, prompts=2, steps=2))],
                         ids=["bf16", "fp8"])
def test_tensorrt_rtx_builds_the_transformer(spec, trt_cache, precision, recipe):
    """bf16, and FP8 after a calibration that edits random-pixel images (the family needs an input image)."""
    builder = ArtifactBuilder(trt_cache)
    req = request(spec, precision, torch.bfloat16, recipe)
    built = builder.engine(req)
    assert built.engine.is_file() and built.report.engine_bytes > 0 and "TensorRT-RTX" in built.report.flavour
    log = built.engine.with_name(built.engine.name + LOG_SUFFIX).read_text()
    assert "image_latents" in log and "image_ids" in log
    if recipe is not None:
        amax = builder.calibration(req)[1]["amax"]
        assert amax and all(built.report.matmuls["transformer." + layer] == "FP8" for layer in amax)
