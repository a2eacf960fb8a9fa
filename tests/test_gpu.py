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


def test_fp8_linear_at_fp16_compute_writes_fp16_on_hopper_and_matches_the_cpu_emulation():
    torch.manual_seed(2)
    linear = nn.Linear(512, 256).to(torch.float16)
    x = torch.randn(64, 512, dtype=torch.float16)
    gpu_layer = Fp8Linear.from_linear(linear.cuda(), torch.float16)
    if torch.cuda.get_device_capability() == (9, 0):  # torch 2.11 + cuBLASLt 13 on the lent H100/H200
        assert gpu_layer.gemm_out_dtype is torch.float16
    cpu_layer = Fp8Linear.from_linear(linear.cpu().float(), torch.float32)
    cpu_layer.gemm_out_dtype = gpu_layer.gemm_out_dtype
    gpu = gpu_layer(x.cuda())
    assert gpu.dtype is torch.float16
    assert rel_err(gpu, cpu_layer(x.float())) < 5e-3  # same quantization; accumulation order and fp16 input


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


def test_cudnn_fp8_attention_matches_the_cpu_emulation():
    """The same quantized inputs through cuDNN's kernel and through the CPU emulation of its arithmetic: they
    differ only by rounding inside the kernel (the order of the exp and of the sums)."""
    from pipelines.fp8_attention import emulate_sdpa_fp8, fp8_attention_problem, quantize_per_tensor

    assert fp8_attention_problem("cuda") is None, fp8_attention_problem("cuda")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 512, 4, 128, generator=g, dtype=torch.bfloat16) for _ in range(3))
    parts = [quantize_per_tensor(t) for t in (q, k, v)]
    args = [p[0] for p in parts] + [p[1] for p in parts] + [128 ** -0.5]
    cpu = emulate_sdpa_fp8(*args).float() * parts[2][1]
    gpu = torch.ops.prism.sdpa_fp8(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args]).float().cpu() * parts[2][1]
    assert rel_err(gpu, cpu) < 0.03


def test_fp8_attention_and_fused_qkv_compile_and_generate_on_the_gpu(tiny_flux, tiny_sdxl):
    """Both levers inside torch.compile, through the manager: FLUX.1 at FP8 with FP8 attention, SDXL at fp16 with
    its projections fused (the default on a GPU)."""
    from pipelines.backends.contract import TorchOptions
    from pipelines.manager import ManagerConfig, PipelineManager

    manager = PipelineManager(ManagerConfig(device="cuda", torch=TorchOptions(compile=True, fp8_attention=True)))
    try:
        flux = manager.generate(GenerationRequest(prompt="a red circle", model=str(tiny_flux), precision="fp8",
                                                  steps=4, seed=1, width=64, height=64))
        sdxl = manager.generate(GenerationRequest(prompt="a red circle", model=str(tiny_sdxl), precision="fp16",
                                                  steps=4, seed=1, width=64, height=64))
    finally:
        manager.close()
    assert flux.runs_as.endswith(" + FP8 attention")
    for result in (flux, sdxl):  # a compile failure runs eager and says so in a warning
        assert result.images[0].size == (64, 64) and not any("compil" in w for w in result.warnings), result.warnings
