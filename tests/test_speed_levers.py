"""The PyTorch backend's speed levers: each with its switch (measured and left off by default), and labelled where this machine
lacks what it needs (a CPU runs these tests: the GPU effects are measured by scripts/gpu_speed_levers.py)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from pipelines.backends.compile_guard import CompiledEngine
from pipelines.backends.contract import TorchOptions
from pipelines.backends.torch_backend import REDUCE_OVERHEAD, TorchBackend, compile_mode, lever_states
from pipelines.cli import build_parser
from pipelines.components import component_key
from pipelines.config import manager_config
from pipelines.device_policy import DevicePolicy
from pipelines.precision import Backend, Precision
from pipelines.registry import resolve_spec


def test_levers_are_off_by_default_and_each_flag_turns_one_on():
    default = manager_config(build_parser().parse_args(["bench", "--model", "demo-sdxl"]))
    assert not default.torch.cuda_graphs and not default.torch.bf16_vae and default.tensorrt.cuda_graphs
    on = manager_config(build_parser().parse_args(["bench", "--model", "demo-sdxl", "--torch-cuda-graphs"]))
    assert on.torch.cuda_graphs and not on.torch.bf16_vae and on.tensorrt.cuda_graphs
    on = manager_config(build_parser().parse_args(["generate", "x", "--bf16-vae"]))
    assert not on.torch.cuda_graphs and on.torch.bf16_vae
    trt_off = manager_config(build_parser().parse_args(["generate", "x", "--no-cuda-graphs"]))
    assert not trt_off.tensorrt.cuda_graphs and not trt_off.torch.cuda_graphs


def test_cuda_graphs_pick_reduce_overhead_on_a_gpu_only_and_an_explicit_mode_wins():
    assert compile_mode(TorchOptions(cuda_graphs=True), "cuda:0") == REDUCE_OVERHEAD
    assert compile_mode(TorchOptions(), "cuda:0") is None
    assert compile_mode(TorchOptions(cuda_graphs=True), "cpu") is None
    assert compile_mode(TorchOptions(compile_mode="max-autotune-no-cudagraphs"), "cuda") == "max-autotune-no-cudagraphs"


def test_labels_say_what_acts_here():
    on = TorchOptions(cuda_graphs=True, bf16_vae=True)
    cpu = lever_states(on, cuda=False)
    assert cpu["CUDA graphs"] == "not available: no CUDA GPU" and cpu["SDXL VAE in bf16"] == "not available: no CUDA GPU"
    assert cpu["torch.compile"] == "off (--no-compile)" and cpu["FP8 attention (FLUX.1 at FP8)"] == "off (--fp8-attention turns it on)"
    assert lever_states(replace(on, fp8_attention=True), cuda=False)["FP8 attention (FLUX.1 at FP8)"] == \
        "on (CPU emulation: the image difference, not the speed)"
    gpu = lever_states(on, cuda=True)
    assert gpu["torch.compile"] == gpu["CUDA graphs"] == gpu["SDXL VAE in bf16"] == "on"
    assert lever_states(TorchOptions(), cuda=True)["CUDA graphs"] == "off (--torch-cuda-graphs turns it on)"
    assert lever_states(replace(on, compile=False), cuda=True)["CUDA graphs"] == "not available: needs torch.compile"
    assert lever_states(TorchOptions(), cuda=True)["SDXL VAE in bf16"] == "off (--bf16-vae turns it on)"
    assert TorchBackend(TorchOptions(compile=True, cuda_graphs=True)).describe() == "PyTorch + torch.compile + CUDA graphs"
    assert TorchBackend(TorchOptions(compile=True, cuda_graphs=False)).describe() == "PyTorch + torch.compile"


def test_a_cpu_manager_records_no_cuda_graphs(cpu_manager):
    backend = cpu_manager.backend(Backend.TORCH)
    assert not backend.options.cuda_graphs and backend.describe() == "PyTorch (eager)"
    assert not cpu_manager.policy.bf16_vae  # off by default


class Adapter(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden_states)


def test_with_cuda_graphs_each_call_returns_its_own_copy_and_the_same_values():
    engine = Adapter().eval()
    x = torch.randn(2, 4)
    graphed = CompiledEngine(engine, lambda: engine.compile(backend="eager"), cuda_graphs=True)
    plain = CompiledEngine(engine, lambda: None)
    with torch.inference_mode():
        a, b = graphed(hidden_states=x), graphed(hidden_states=x)
        torch.testing.assert_close(a, plain(hidden_states=x))
    assert a.data_ptr() != b.data_ptr()  # the next replay cannot overwrite an output a scheduler kept


@pytest.mark.parametrize("capability, lever, expected", [
    ((9, 0), True, torch.bfloat16),   # Hopper: bf16 instead of fp32
    ((9, 0), False, torch.float32),   # switched off: diffusers' fp32 upcast
    ((7, 5), True, torch.float32),    # no bf16 on this GPU: fp32 as before
])
def test_the_sdxl_vae_runs_in_bf16_where_fp16_would_overflow(capability, lever, expected):
    spec = resolve_spec("sdxl-base-1.0")
    policy = replace(DevicePolicy.for_device(capability), bf16_vae=lever)
    assert policy.component_dtype(spec, "vae", Precision.FP16) == expected
    assert policy.component_dtype(spec, "vae_encoder", Precision.FP16) == expected
    assert policy.component_dtype(spec, "unet", Precision.FP16) == torch.float16  # only the VAE changes
    # the residency key names the dtype, so switching the lever never reuses the other form
    assert component_key(spec, "vae", Precision.FP16, "torch", policy).variant == str(expected).removeprefix("torch.")


def test_the_lever_leaves_tensorrt_builds_and_cpus_alone():
    spec = resolve_spec("sdxl-base-1.0")
    assert DevicePolicy.for_target((9, 0)).component_dtype(spec, "vae", Precision.FP16) == torch.float32
    cpu = replace(DevicePolicy.for_device(None), bf16_vae=True)
    assert cpu.component_dtype(spec, "vae", Precision.FP16) == replace(cpu, bf16_vae=False).component_dtype(
        spec, "vae", Precision.FP16)
