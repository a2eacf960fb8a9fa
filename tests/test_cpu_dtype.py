"""On a CPU, 16-bit types compute natively only where the CPU runs them fast; elsewhere 16-bit weights compute in
FP32 and every label says so. CPU speeds are injected (CpuMath) so both paths run on any machine."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cpu_math import FAST_CPU, CpuMath, measure_cpu_math
from pipelines.device_policy import DevicePolicy
from pipelines.precision import Backend, Precision, SupportLevel, precision_support
from pipelines.registry import resolve_spec
from pipelines.request import GenerationRequest

ROOT = Path(__file__).resolve().parents[1]
SLOW_CPU = CpuMath("AMD EPYC (AVX2 only)", ("avx2",), fast_bf16=False, fast_fp16=False, measured="bf16 160x")
BF16_ONLY = CpuMath("Xeon (AMX)", ("amx_bf16",), fast_bf16=True, fast_fp16=False)


def test_policy_computes_16_bit_only_where_the_cpu_is_fast():
    flux, sdxl = resolve_spec("demo-flux"), resolve_spec("demo-sdxl")
    slow, fast, bf16_only = (DevicePolicy.for_device(None, c) for c in (SLOW_CPU, FAST_CPU, BF16_ONLY))
    for precision in Precision:
        assert slow.compute_dtype(flux, precision) == torch.float32
        assert slow.component_dtype(sdxl, "vae", precision) == torch.float32
    assert slow.weight_dtype(flux, "transformer", "bf16") == torch.bfloat16  # weights keep their 16-bit rounding
    assert slow.weight_dtype(sdxl, "unet", "fp16") == torch.float16
    assert fast.compute_dtype(flux, "bf16") == torch.bfloat16 and fast.compute_dtype(sdxl, "fp16") == torch.float16
    assert bf16_only.compute_dtype(sdxl, "fp16") == torch.float32 and bf16_only.compute_dtype(sdxl, "bf16") == torch.bfloat16
    assert bf16_only.compute_dtype(flux, "fp8") == torch.bfloat16  # FP8/FP4 emulation computes in bf16 on a CPU
    # A GPU is never affected by what the CPU can do.
    gpu = DevicePolicy(capability=(9, 0), cpu=False, cpu_math=SLOW_CPU)
    assert gpu.compute_dtype(flux, "bf16") == torch.bfloat16
    # The reference Compare uses stays the 16-bit type, whatever the CPU computes in.
    assert slow.reference_precision(flux) == Precision.BF16


def test_labels_say_what_runs_on_a_slow_cpu():
    bf16 = precision_support("bf16", None, Backend.TORCH, SLOW_CPU)
    assert bf16.runs_as == "BF16 weights, FP32 compute" and bf16.level is SupportLevel.EMULATED
    assert "no fast BF16" in bf16.reason
    assert precision_support("fp8", None, Backend.TORCH, SLOW_CPU).runs_as == "FP8 (CPU emulation, FP32 compute)"
    assert precision_support("fp4", None, Backend.TORCH, SLOW_CPU).runs_as == "FP4 weights, FP32 compute"
    assert precision_support("fp16", None, Backend.TORCH, BF16_ONLY).runs_as == "FP16 weights, FP32 compute"
    assert precision_support("bf16", None, Backend.TORCH, BF16_ONLY).runs_as == "BF16"
    assert precision_support("bf16", None, Backend.TORCH).runs_as == "BF16"  # an unmeasured CPU: as before


@pytest.fixture(scope="module")
def managers():
    from conftest import fast_16bit_cpu
    from pipelines.manager import ManagerConfig, PipelineManager

    fast_info = fast_16bit_cpu()
    made = {name: PipelineManager(ManagerConfig(device="cpu"), device_info=replace(fast_info, cpu_math=cpu))
            for name, cpu in (("slow", SLOW_CPU), ("fast", FAST_CPU))}
    yield made
    for manager in made.values():
        manager.close()


@pytest.mark.parametrize("model", ["demo-flux", "demo-sdxl"])
def test_a_slow_cpu_draws_the_same_picture_in_fp32_and_says_so(managers, model, tmp_path):
    from pipelines.pngmeta import read_png_metadata, save_png

    request = GenerationRequest("a small red circle at the top left on a blue background", model, "bf16", seed=5)
    slow = managers["slow"].generate(request)
    fast = managers["fast"].generate(request)
    assert slow.runs_as == "BF16 weights, FP32 compute" and fast.runs_as == "BF16"
    a, b = (np.asarray(r.images[0], dtype=np.float64) for r in (slow, fast))
    assert np.abs(a - b).mean() < 3.0  # same weights, FP32 vs BF16 arithmetic (0..255 scale)
    denoiser = managers["slow"].status().resident
    assert any(r.key.name == resolve_spec(model).denoiser for r in denoiser)
    path = save_png(tmp_path / "slow.png", slow.images[0], slow.settings(), slow.seeds[0])
    assert read_png_metadata(path)["settings"]["runs_as"] == "BF16 weights, FP32 compute"


def test_fp32_compute_keeps_the_16_bit_rounding_of_the_weights(managers):
    from pipelines.loading import WeightSource

    spec = resolve_spec("demo-flux")
    backend = managers["slow"].backend(Backend.TORCH)
    loaded = backend.load(spec, "transformer", Precision.BF16, "cpu", managers["slow"].policy, WeightSource())
    weights = [p for p in loaded.obj.parameters()]
    assert loaded.dtype == torch.float32 and all(p.dtype == torch.float32 for p in weights)
    assert all(torch.equal(p, p.to(torch.bfloat16).float()) for p in weights)  # bf16 values, stored as fp32


def test_the_cpu_probe_measures_and_sees_slow_16_bit_math(tmp_path):
    here = measure_cpu_math()
    assert here.name and "fp32 matmul" in here.measured
    if platform.machine() != "x86_64":
        return
    # oneDNN and ATen limited to AVX2 run bf16/fp16 like an AVX2-only CPU does: ~50-160x slower than fp32.
    code = "import json; from pipelines.cpu_math import measure_cpu_math as m; c = m(); print(json.dumps([c.fast_bf16, c.fast_fp16]))"
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, False]
