"""GPU checks, run on the lent H100 (`pytest -m gpu`); CI deselects them. They fail, never skip, without a GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.quant import Fp8Linear, Nvfp4WeightOnlyLinear
from pipelines.request import GenerationRequest

pytestmark = pytest.mark.gpu


def rel_err(a, b) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def test_a_cuda_gpu_is_present():
    assert torch.cuda.is_available(), "these tests need a CUDA GPU"


def test_fp8_linear_on_the_gpu_matches_the_cpu_emulation():
    torch.manual_seed(0)
    linear = nn.Linear(512, 256).to(torch.bfloat16)
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    cpu = Fp8Linear.from_linear(linear, torch.bfloat16)(x)
    gpu = Fp8Linear.from_linear(linear.cuda(), torch.bfloat16)(x.cuda())
    assert rel_err(gpu, cpu) < 1e-2  # same quantization; only accumulation order differs
    assert 0.005 < rel_err(gpu, linear.cpu()(x)) < 0.06


def test_fp4_weight_only_on_the_gpu_matches_the_cpu():
    torch.manual_seed(1)
    linear = nn.Linear(512, 256).to(torch.bfloat16)
    x = torch.randn(8, 512, dtype=torch.bfloat16)
    cpu = Nvfp4WeightOnlyLinear.from_linear(linear, torch.bfloat16)(x)
    gpu = Nvfp4WeightOnlyLinear.from_linear(linear.cuda(), torch.bfloat16)(x.cuda())
    assert rel_err(gpu, cpu) < 1e-2


@pytest.mark.parametrize("compile_", [False, True])
def test_tiny_flux_generates_on_the_gpu_at_every_precision(tiny_flux, compile_):
    from pipelines.backends.contract import TorchOptions
    from pipelines.manager import ManagerConfig, PipelineManager

    manager = PipelineManager(ManagerConfig(device="cuda", torch=TorchOptions(compile=compile_)))
    try:
        cc = torch.cuda.get_device_capability()
        # Compiling costs ~30 s a precision: the compiled pass checks the FP8 layers inside compiled blocks.
        for precision in ("fp8",) if compile_ else ("bf16", "fp16", "fp8", "fp4"):
            result = manager.generate(GenerationRequest(prompt="a red circle", model=str(tiny_flux), seed=1,
                                                        precision=precision, steps=2))
            assert result.images[0].size == (32, 32)
            assert result.peak_memory_bytes and result.peak_memory_bytes > 0
            if precision == "fp8":
                assert result.runs_as == "FP8"
            if precision == "fp4":
                assert result.runs_as == ("FP4" if cc >= (10, 0) else "FP4 weights, 16-bit compute")
    finally:
        manager.close()
