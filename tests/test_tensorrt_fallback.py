"""A TensorRT failure during a job (build, engine load, execution) reruns the job on PyTorch and says so; the
failing engine is remembered so later jobs do not rebuild it in a loop, until the engine cache is cleared."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.backends.tensorrt import artifacts
from pipelines.backends.tensorrt.backend import TensorRTOptions
from pipelines.backends.tensorrt.trt_api import BuildFailed
from pipelines.request import GenerationRequest
from test_tensorrt_runtime import FakeContext, _manager, fake_trt  # the fake GPU: real builds, onnxruntime engines

OPTIONS = TensorRTOptions(calibration_prompts=2, calibration_steps=2)


def _request(tiny_sdxl, **changes) -> GenerationRequest:
    base = dict(prompt="a red fox", model=str(tiny_sdxl), precision="fp16", steps=2, seed=3, backend="tensorrt")
    return GenerationRequest(**{**base, **changes})


def _on_torch(manager, tiny_sdxl):
    return manager.generate(_request(tiny_sdxl, backend="torch"), timeout=600)


def test_a_failing_build_runs_the_job_on_pytorch_and_is_not_retried(monkeypatch, trt_cache, tiny_sdxl):
    builds = []

    def failing_engine(self, req):
        builds.append(req.component)
        raise BuildFailed("[TRT] no implementation of layer /unet/conv_in supports this tactic")

    monkeypatch.setattr(artifacts.ArtifactBuilder, "engine", failing_engine)
    manager = _manager(trt_cache, OPTIONS)
    try:
        first = manager.generate(_request(tiny_sdxl), timeout=600)
        second = manager.generate(_request(tiny_sdxl, seed=4), timeout=600)
        reference = _on_torch(manager, tiny_sdxl)
        manager.forget_tensorrt_failures()  # what clearing the engine cache does
        manager.generate(_request(tiny_sdxl), timeout=600)
    finally:
        manager.close()
    assert first.backend.startswith("PyTorch") and first.runs_as == "FP16"
    assert any(w.startswith("TensorRT failed (build or load: BuildFailed: [TRT] no implementation") and
               w.endswith("ran on PyTorch.") for w in first.warnings), first.warnings
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(reference.images[0]))  # the same job, on PyTorch
    assert any(w.startswith("TensorRT failed earlier") for w in second.warnings)
    assert builds == ["text_encoder", "text_encoder"]  # once, and once more only after the cache was cleared


def test_an_engine_that_cannot_be_loaded_falls_back(trt_cache, tiny_sdxl):
    class BrokenRuntime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            raise RuntimeError("Serialization assertion failed: magic tag mismatch")

    trt = fake_trt(trt_cache)
    trt.module.Runtime = BrokenRuntime
    manager = _manager(trt_cache, OPTIONS, trt=trt)
    try:
        result = manager.generate(_request(tiny_sdxl), timeout=600)
    finally:
        manager.close()
    assert result.backend.startswith("PyTorch")
    assert any("magic tag mismatch" in w and "build or load" in w for w in result.warnings), result.warnings
    assert not any(r.key.backend == "tensorrt" for r in manager.status().resident)  # nothing half-loaded stays


def test_an_engine_that_fails_to_run_falls_back(monkeypatch, trt_cache, tiny_sdxl):
    monkeypatch.setattr(FakeContext, "execute_async_v3", lambda self, stream: False)
    manager = _manager(trt_cache, OPTIONS)
    try:
        result = manager.generate(_request(tiny_sdxl), timeout=600)
        reference = _on_torch(manager, tiny_sdxl)
    finally:
        manager.close()
    assert result.backend.startswith("PyTorch")
    assert any(w.startswith("TensorRT failed (execution:") for w in result.warnings), result.warnings
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(reference.images[0]))


def test_cancelling_a_tensorrt_job_is_not_a_tensorrt_failure(monkeypatch, trt_cache, tiny_sdxl):
    from pipelines.run_context import JobCancelled

    def cancelled(self, req):
        raise JobCancelled("The job was cancelled.")

    monkeypatch.setattr(artifacts.ArtifactBuilder, "engine", cancelled)
    manager = _manager(trt_cache, OPTIONS)
    try:
        with pytest.raises(JobCancelled):
            manager.generate(_request(tiny_sdxl), timeout=600)
        followup = manager.generate(_request(tiny_sdxl, backend="torch"), timeout=600)
    finally:
        manager.close()
    assert followup.images  # still serving
